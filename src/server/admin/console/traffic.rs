//! The overview's "last hour": the gateway's own counters sampled once a minute (and at
//! start), so that the difference to the sample closest to an hour ago is the last hour's
//! traffic — or, in a gateway younger than an hour, the traffic since it started.

use crate::pipeline::metrics::{Metrics, Totals};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);

/// Samples of the counters, oldest first, none older than an hour and a minute.
#[derive(Debug, Default)]
pub struct Traffic {
    samples: Mutex<VecDeque<(Instant, Totals)>>,
}

/// The traffic of a window.
#[derive(Debug, Clone)]
pub struct Window {
    /// How long the window is (an hour, or the gateway's age when younger).
    pub minutes: u64,
    pub counts: Totals,
}

impl Traffic {
    /// Records the counters now.
    pub fn sample(&self, metrics: &Metrics) {
        let now = Instant::now();
        let totals = metrics.totals();
        let Ok(mut s) = self.samples.lock() else { return };
        s.push_back((now, totals));
        while s.len() > 1 && s.front().is_some_and(|(t, _)| now.duration_since(*t) > HOUR + Duration::from_secs(60)) {
            s.pop_front();
        }
    }

    /// The traffic since the oldest sample at most an hour old.
    pub fn last_hour(&self, metrics: &Metrics) -> Window {
        let now = Instant::now();
        let current = metrics.totals();
        let base = self
            .samples
            .lock()
            .ok()
            .and_then(|s| s.iter().find(|(t, _)| now.duration_since(*t) <= HOUR).map(|(t, c)| (*t, c.clone())));
        match base {
            Some((t, c)) => Window { minutes: now.duration_since(t).as_secs().div_ceil(60), counts: current.since(&c) },
            None => Window { minutes: 0, counts: current },
        }
    }
}
