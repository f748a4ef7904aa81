//! The files under `deploy/` against the gateway they deploy: the alert
//! rules and the dashboard name only metrics a real scrape shows (a renamed metric fails
//! here), every alert has its runbook section, the Kubernetes config loads and fits the
//! Deployment's mounts and grace period, the Dockerfile's health check is a command the
//! binary really has. CI additionally runs promtool, kubernetes-validate, hadolint and
//! systemd-analyze on them (.ci/run).

use crate::support::client::H1;
use crate::support::creds::Creds;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::process::{GatewayProcess, run_cli};
use crate::support::upstream::{Mode, TestUpstream};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_saphyr::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every string anywhere in `v`.
fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// The metric names (`gatehouse_*`, `process_*`) that PromQL in `v` mentions.
fn metric_names(v: &Value) -> BTreeSet<String> {
    let mut all = Vec::new();
    strings(v, &mut all);
    let mut names = BTreeSet::new();
    for s in all {
        let mut rest = s;
        while let Some(at) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
            let tail = &rest[at..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            let word = &tail[..end];
            if word.starts_with("gatehouse_") || word.starts_with("process_") {
                names.insert(word.to_string());
            }
            rest = &tail[end..];
        }
    }
    names
}

/// The names a real scrape exposes (histograms also as `_bucket`, `_sum`, `_count`).
async fn exposed() -> BTreeSet<String> {
    let up = TestUpstream::start().await;
    let down = TestUpstream::with(Mode::Refused).await;
    let mut creds = Creds::new();
    let key = creds.api_user("erp");
    creds.user("erp").rate_limit = Some(serde_saphyr::Spanned::new(
        gatehouse::credentials::file::FileRateLimit { per_second: 1, burst: 1 },
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    ));
    let other = creds.api_user("other");
    // With shared state, so that its families (and the panels and alerts on them) count.
    let redis = format!("redis://127.0.0.1:{}", crate::support::redis::shared().await);
    let gw = TestGateway::builder()
        .credentials(&creds)
        .admin("admin-test-token-0123456789abcdef")
        .shared_state("redis", &redis)
        .shared_state("key_prefix", &format!("\"{}\"", crate::support::redis::unique_prefix("exposed")))
        .tls()
        .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
        .route(RouteSpec::new("down", "/down/").to(&down).authenticated())
        .start()
        .await;
    let client = H1::new();
    // A family shows in a scrape once it has a series: one request of each kind.
    let h = [("x-api-key", key.token.as_str())];
    assert_eq!(client.get_with(&gw.url("/api/a"), &h).await.status, 200);
    assert_eq!(client.get_with(&gw.url("/api/a"), &h).await.status, 429);
    assert_eq!(client.get(&gw.url("/api/a")).await.status, 401);
    assert_eq!(client.get_with(&gw.url("/down/a"), &[("x-api-key", other.token.as_str())]).await.status, 502);
    let mut text = client.get(&format!("http://{}/metrics", gw.admin_addr())).await.text();
    // And a gateway on the credential database, for its families.
    let db = crate::support::postgres::fresh_database("exposed").await;
    let on_db = crate::support::process::GatewayProcess::serve(
        &crate::support::gateway::GatewayConfig::new()
            .database(&db)
            .database_setting("credentials_auto_migrate", "true")
            .admin("admin-test-token-0123456789abcdef"),
    )
    .await;
    text.push_str(&on_db.admin().get("/metrics").await.text());
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(decl) = line.strip_prefix("# TYPE ") else { continue };
        let mut parts = decl.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        if kind == "histogram" {
            names.insert(name.to_string());
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        } else {
            names.insert(name.to_string());
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboard_name_only_metrics_a_real_scrape_exposes() {
    let exposed = exposed().await;
    assert!(exposed.contains("gatehouse_requests_total") && exposed.contains("process_resident_memory_bytes"));

    let alerts = yaml("deploy/prometheus/alerts.yaml");
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/gatehouse-dashboard.json")).unwrap();
    for (file, v, at_least) in [("alerts.yaml", &alerts, 5), ("gatehouse-dashboard.json", &dashboard, 14)] {
        let used = metric_names(v);
        let unknown: Vec<_> = used.difference(&exposed).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics the gateway does not expose: {unknown:?}\nexposed: {exposed:?}"
        );
        assert!(used.len() >= at_least, "{file} names only {used:?}");
    }

    // Every alert: a `for`, a severity, its texts, and a runbook section that exists, under
    // one base URL (deploy/prometheus/set-runbook-base.sh sets it).
    let anchors = crate::docs::anchors(&read("docs/runbook.md"));
    let mut bases = BTreeSet::new();
    let rules = alerts["groups"][0]["rules"].as_array().unwrap();
    assert!(rules.len() >= 5);
    for r in rules {
        let name = r["alert"].as_str().unwrap();
        assert!(r["for"].is_string(), "{name}: no for");
        assert!(["warning", "critical"].contains(&r["labels"]["severity"].as_str().unwrap_or("")), "{name}: severity");
        for a in ["summary", "description", "runbook_url"] {
            assert!(r["annotations"][a].is_string(), "{name}: no {a}");
        }
        let url = r["annotations"]["runbook_url"].as_str().unwrap();
        let (base, anchor) = url.split_once('#').unwrap_or_else(|| panic!("{name}: no #section in {url}"));
        assert!(base.starts_with("https://"), "{name}: runbook_url is not a full URL: {url}");
        bases.insert(base);
        assert!(anchors.contains(anchor), "{name}: docs/runbook.md has no section #{anchor}: {anchors:?}");
    }
    assert_eq!(bases.len(), 1, "every runbook_url under one base: {bases:?}");

    // Every panel queries through the ${DS_PROMETHEUS} input.
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    for p in dashboard["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        assert!(!p["targets"].as_array().unwrap().is_empty(), "{}", p["title"]);
    }
}

/// The database mode's ConfigMap (examples/configmap-database.yaml): it loads, names a
/// database whose password comes from the env the Deployment fills from the Secret
/// gatehouse-db, and keeps the master key in the Secret mount.
#[test]
fn the_kubernetes_database_config_loads_and_fits_the_deployment() {
    let cm = yaml("deploy/kubernetes/examples/configmap-database.yaml");
    assert_eq!(cm["metadata"]["name"], "gatehouse", "it replaces the file mode's ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gatehouse.yaml");
    std::fs::write(&path, cm["data"]["gatehouse.yaml"].as_str().unwrap()).unwrap();
    let env: std::collections::HashMap<String, String> = [
        ("GATEHOUSE_REDIS_PASSWORD".to_string(), "from-the-secret".to_string()),
        ("GATEHOUSE_DB_PASSWORD".to_string(), "from-the-db-secret".to_string()),
    ]
    .into();
    let config = gatehouse::config::Config::load_with_env(&path, &env)
        .unwrap_or_else(|e| panic!("the database ConfigMap's config: {e}"));
    let db = config.credential_db.as_ref().expect("credentials: postgres://…");
    assert_eq!(db.password.as_ref().map(|p| p.0.as_str()), Some("from-the-db-secret"));
    assert!(config.credentials.is_none());
    let d = yaml("deploy/kubernetes/deployment.yaml");
    assert_eq!(d["spec"]["replicas"], 3);
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    let env = c["env"].as_array().unwrap().iter().find(|e| e["name"] == "GATEHOUSE_DB_PASSWORD").unwrap();
    assert_eq!(env["valueFrom"]["secretKeyRef"]["name"], "gatehouse-db");
    let secrets = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "credentials").unwrap();
    assert_eq!(config.master_key.parent(), Some(std::path::Path::new(secrets["mountPath"].as_str().unwrap())));
}

#[test]
fn the_kubernetes_config_loads_and_fits_the_deployment() {
    let cm = yaml("deploy/kubernetes/configmap.yaml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gatehouse.yaml");
    std::fs::write(&path, cm["data"]["gatehouse.yaml"].as_str().unwrap()).unwrap();
    let env: std::collections::HashMap<String, String> =
        [("GATEHOUSE_REDIS_PASSWORD".to_string(), "from-the-secret".to_string())].into();
    let config =
        gatehouse::config::Config::load_with_env(&path, &env).unwrap_or_else(|e| panic!("the ConfigMap's config: {e}"));

    let d = yaml("deploy/kubernetes/deployment.yaml");
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let mount = |volume: &str| -> PathBuf {
        let m = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == volume).unwrap();
        assert!(m.get("subPath").is_none(), "{volume}: a subPath mount never sees kubelet's ..data swap");
        PathBuf::from(m["mountPath"].as_str().unwrap())
    };
    let volume = |name: &str| pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap().clone();
    // The config the container is started with is the ConfigMap's.
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args, ["serve", "--config", mount("config").join("gatehouse.yaml").to_str().unwrap()]);
    // Credentials and master key in the Secret's directory mount; usage state on the emptyDir.
    let secrets = mount("credentials");
    assert_eq!(volume("credentials")["secret"]["secretName"], "gatehouse-credentials");
    assert_eq!(config.credentials.as_deref().unwrap().parent(), Some(secrets.as_path()));
    assert_eq!(config.master_key.parent(), Some(secrets.as_path()));
    assert!(config.usage_state.as_deref().unwrap().starts_with(mount("state")));
    assert!(volume("state")["emptyDir"].is_object());
    let token = config.admin.as_ref().unwrap().token_file.as_deref().unwrap();
    assert!(token.starts_with(mount("admin-token")));
    // Probes on the admin listener's port.
    let admin_port = config.admin.as_ref().unwrap().address.port();
    let port_of = |name: &str| {
        c["ports"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()["containerPort"].clone()
    };
    assert_eq!(port_of("admin"), admin_port);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    // SIGTERM's drain fits in the grace period, after the preStop pause.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap_or(0);
    assert!(grace > pre_stop + config.limits.shutdown_grace.as_secs(), "grace {grace}s");
    // Non-root, read-only root, no capabilities.
    let sc = &c["securityContext"];
    assert_eq!(
        (sc["readOnlyRootFilesystem"].clone(), sc["allowPrivilegeEscalation"].clone()),
        (true.into(), false.into())
    );
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    // Three replicas, sharing state through Redis, its password from a Secret.
    assert_eq!(d["spec"]["replicas"], 3);
    let shared = config.shared_state.as_ref().expect("the ConfigMap shares state through Redis");
    assert_eq!(shared.password.as_ref().map(|p| p.0.as_str()), Some("from-the-secret"));
    let redis_env = c["env"].as_array().unwrap().iter().find(|e| e["name"] == "GATEHOUSE_REDIS_PASSWORD").unwrap();
    assert_eq!(redis_env["valueFrom"]["secretKeyRef"]["name"], "gatehouse-redis");
    assert_eq!(yaml("deploy/kubernetes/hpa.yaml")["spec"]["minReplicas"], 3);

    // The systemd unit waits longer than the drain, and reloads with SIGHUP.
    let unit = read("deploy/systemd/gatehouse.service");
    let stop = unit.lines().find_map(|l| l.strip_prefix("TimeoutStopSec=")).unwrap();
    let stop = gatehouse::config::units::parse_duration(stop).unwrap();
    assert!(stop > config.limits.shutdown_grace, "TimeoutStopSec={stop:?}");
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dockerfile_runs_gatehouse_as_non_root_and_its_health_check_command_works() {
    let text = read("deploy/Dockerfile");
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    let froms: Vec<_> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "not multi-stage: {froms:?}");
    let last = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let final_stage = &lines[last..];
    let user = final_stage.iter().find_map(|l| l.strip_prefix("USER ")).expect("final stage sets no USER");
    assert!(!["root", "0", "0:0"].contains(&user), "USER {user}");
    assert!(final_stage.contains(&r#"ENTRYPOINT ["gatehouse"]"#), "{final_stage:?}");
    assert!(text.contains("cargo build --profile dist --locked") && text.contains("target/dist/gatehouse"));
    let health = text.split("HEALTHCHECK").nth(1).expect("no HEALTHCHECK");
    assert!(
        health.contains(r#"CMD ["gatehouse", "healthcheck", "--config", "/etc/gatehouse/gatehouse.yaml"]"#),
        "{health}"
    );
    assert!(
        text.contains(r#"CMD ["serve", "--config", "/etc/gatehouse/gatehouse.yaml"]"#),
        "the check reads the config serve runs"
    );

    // The command the health check runs: 0 against a live admin listener, else one line, 1.
    let gw = GatewayProcess::serve(&TestGateway::builder().admin("admin-test-token-0123456789abcdef")).await;
    let live = format!("http://{}/healthz", gw.admin_addr());
    let out = run_cli(&["healthcheck", "--url", &live]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let missing = format!("http://{}/no-such-path", gw.admin_addr());
    let closed = format!("http://127.0.0.1:{}/healthz", crate::support::free_port());
    for url in [missing, closed] {
        let out = run_cli(&["healthcheck", "--url", &url]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {err}");
        assert!(err.starts_with("gatehouse healthcheck: ") && err.lines().count() == 1, "{err:?}");
    }

    // --config: the admin address the config names (0.0.0.0 asked on loopback); a config
    // without an admin listener is one line and exit 1.
    let dir = tempfile::tempdir().unwrap();
    let config = |admin: &str| {
        let path = dir.path().join(format!("gatehouse-{}.yaml", admin.len()));
        let yaml = format!(
            "listeners:\n  - address: 127.0.0.1:0\n    name: main\n{admin}routes:\n  - name: api\n    \
             path_prefix: /\n    upstream: http://127.0.0.1:9\n    allow_anonymous: true\n"
        );
        std::fs::write(&path, yaml).unwrap();
        path.display().to_string()
    };
    let any = config(&format!("admin:\n  address: 0.0.0.0:{}\n", gw.admin_addr().port()));
    let out = run_cli(&["healthcheck", "--config", &any]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let none = config("");
    let out = run_cli(&["healthcheck", "--config", &none]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no admin listener") && err.lines().count() == 1, "{err:?}");
}
