//! The documentation: every relative link and anchor resolves, every table and code block
//! renders on GitHub, nothing points outside the repository, and the signing clients in
//! docs/authentication.md work, exactly as written, against a real gateway.

use crate::support::creds::Creds;
use crate::support::gateway::{RouteSpec, TestGateway};
use crate::support::upstream::TestUpstream;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown pages a reader opens.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md"), root().join("benches/README.md"), root().join("deploy/README.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            pages.push(p);
        }
    }
    pages.sort();
    pages
}

/// GitHub's anchor for a heading: lower case; letters, digits, `-` and `_` kept, spaces
/// to `-`, everything else dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The page's lines outside fenced code blocks (with their 1-based numbers), and whether
/// every fence was closed.
fn prose(text: &str) -> (Vec<(usize, &str)>, bool) {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        match fence {
            Some(f) if t.starts_with(f) && t.trim_start_matches(f).trim().is_empty() => fence = None,
            Some(_) => {}
            None if t.starts_with("```") || t.starts_with("~~~") => fence = Some(&t[..3]),
            None => out.push((i + 1, line)),
        }
    }
    (out, fence.is_none())
}

/// The anchors of a Markdown page's headings.
pub fn anchors(text: &str) -> BTreeSet<String> {
    prose(text).0.iter().filter_map(|(_, l)| l.strip_prefix('#')).map(|h| anchor(h.trim_start_matches('#'))).collect()
}

/// `[text](target)` links of a line, code spans removed first.
fn links(line: &str) -> Vec<String> {
    let mut plain = String::new();
    for (i, part) in line.split('`').enumerate() {
        if i % 2 == 0 {
            plain.push_str(part);
        }
    }
    let mut out = Vec::new();
    let mut rest = plain.as_str();
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    out
}

/// The cells of a table row: `|` inside a code span or escaped as `\|` does not split.
fn cells(row: &str) -> usize {
    let (mut n, mut code, mut prev) = (0, false, ' ');
    for c in row.trim().trim_start_matches('|').trim_end_matches('|').chars() {
        match c {
            '`' => code = !code,
            '|' if !code && prev != '\\' => n += 1,
            _ => {}
        }
        prev = c;
    }
    n + 1
}

#[test]
fn every_link_anchor_table_and_code_block_renders() {
    let mut problems = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = page.strip_prefix(root()).unwrap().display().to_string();
        let (lines, closed) = prose(&text);
        if !closed {
            problems.push(format!("{name}: a code block is never closed"));
        }
        for (n, line) in &lines {
            for target in links(line) {
                if target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:") {
                    continue;
                }
                let (file, frag) = target.split_once('#').unwrap_or((&target, ""));
                let dest = if file.is_empty() { page.clone() } else { page.parent().unwrap().join(file) };
                if !dest.exists() {
                    problems.push(format!("{name}:{n}: {target}: no such file"));
                    continue;
                }
                if !frag.is_empty() && !anchors(&std::fs::read_to_string(&dest).unwrap_or_default()).contains(frag) {
                    problems.push(format!("{name}:{n}: {target}: no such section"));
                }
            }
        }
        // A table is a header row, a separator row with as many cells, then rows with as
        // many; a row after a blank line starts a new table, so without its own header
        // it renders as text (the mistake that cut the configuration table in two).
        let mut i = 0;
        while i < lines.len() {
            let (n, line) = lines[i];
            if !line.trim_start().starts_with('|') {
                i += 1;
                continue;
            }
            let width = cells(line);
            let separator = lines.get(i + 1).filter(|(m, _)| *m == n + 1).map(|(_, l)| *l).unwrap_or("");
            let is_separator = |l: &str| {
                l.trim().trim_matches('|').split('|').all(|c| {
                    let c = c.trim();
                    !c.is_empty() && c.chars().all(|ch| ch == '-' || ch == ':')
                })
            };
            if !is_separator(separator) || cells(separator) != width {
                problems.push(format!("{name}:{n}: a table row without a header and separator above it"));
            }
            let mut j = i + 2;
            while let Some((m, l)) = lines.get(j).filter(|(m, l)| *m == n + (j - i) && l.trim_start().starts_with('|'))
            {
                if cells(l) != width {
                    problems.push(format!("{name}:{m}: {} cells in a table of {width}", cells(l)));
                }
                j += 1;
            }
            i = j;
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn nothing_in_the_repository_points_outside_it() {
    // Built from parts so that this file does not match itself.
    let outside = ["../".to_string() + "shared", "SPEC".to_string() + " §", "SPEC".to_string() + ".md"];
    let mut found = Vec::new();
    let mut dirs = vec![root().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let file = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                if !["target", ".git"].contains(&file.as_str()) {
                    dirs.push(p);
                }
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&p) else { continue };
            for (n, line) in text.lines().enumerate() {
                let lower = line.to_lowercase();
                let issue = lower.match_indices("issue ").any(|(i, m)| {
                    lower[i + m.len()..].trim_start_matches('#').starts_with(|c: char| c.is_ascii_digit())
                });
                if issue || outside.iter().any(|o| line.contains(o.as_str())) {
                    found.push(format!("{}:{}: {line}", p.strip_prefix(root()).unwrap().display(), n + 1));
                }
            }
        }
    }
    assert!(found.is_empty(), "cite docs/ instead:\n{}", found.join("\n"));
}

/// The code blocks of docs/authentication.md marked `<!-- tested: LANG -->`.
fn marked_blocks() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("docs/authentication.md")).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(lang) = line.strip_prefix("<!-- tested: ").and_then(|l| l.strip_suffix(" -->")) else { continue };
        assert!(lines.next().is_some_and(|l| l.starts_with("```")), "a fence right after the {lang} marker");
        let code: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
        out.push((lang.to_string(), code.join("\n") + "\n"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signing_clients_in_the_docs_work_against_a_real_gateway() {
    let blocks = marked_blocks();
    let langs: Vec<&str> = blocks.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(langs, ["sh", "python", "node"]);
    let dir = tempfile::tempdir().unwrap();
    for (lang, code) in &blocks {
        // A gateway each: the three sign the same request, and within one second the
        // second would be a replay of the first.
        let up = TestUpstream::start().await;
        let mut creds = Creds::new();
        let key = creds.hmac_user("erp-sync");
        let gw = TestGateway::builder()
            .credentials(&creds)
            .route(RouteSpec::new("api", "/api/").to(&up).authenticated())
            .start()
            .await;
        let (file, program) = match lang.as_str() {
            "sh" => ("client.sh", "bash"),
            "python" => ("client.py", "python3"),
            _ => ("client.js", "node"),
        };
        let path = dir.path().join(file);
        std::fs::write(&path, code).unwrap();
        let out = tokio::process::Command::new(program)
            .arg(&path)
            .env("GATEHOUSE_URL", format!("http://{}", gw.addr()))
            .env("GATEHOUSE_KEY_ID", &key.key_id)
            .env("GATEHOUSE_SECRET", &key.secret)
            .output()
            .await
            .unwrap_or_else(|e| panic!("{program} (installed by .ci/run) does not run: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{lang}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.trim_end().ends_with(" 200"), "{lang}: {stdout}");
        // The upstream got the signed request, body and query intact, as that user.
        assert_eq!(up.count(), 1, "{lang}");
        let seen = up.requests().pop().unwrap();
        assert_eq!((seen.method.as_str(), seen.target.as_str()), ("POST", "/api/v1/orders?dry_run=1"), "{lang}");
        assert_eq!(seen.body_prefix, br#"{"order":42}"#, "{lang}");
        assert_eq!(seen.header("x-gatehouse-user"), "erp-sync", "{lang}");
    }
}
