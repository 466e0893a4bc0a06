//! What the figures were measured on: the machine, the versions, the date, and CPU time.

use serde::{Deserialize, Serialize};

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    /// The device the model ran on (`cpu`, `cuda:0 (NVIDIA H100 …)`).
    pub device: String,
}

/// Versions of what was measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Versions {
    pub appliance: String,
    pub libtorch: String,
    pub tch: String,
    pub wasmtime: String,
    /// Build profile of the bench binary (`release` for figures that count).
    pub profile: String,
}

impl Machine {
    pub fn read(device: String) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or_else(|| "unknown CPU".to_string(), |s| s.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib: (memory_kib / (1024.0 * 1024.0) * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
            device,
        }
    }

    /// One line for a report's heading.
    pub fn line(&self) -> String {
        format!("{}, {} cores, {} GiB, model on {}", self.cpu, self.cores, self.memory_gib, self.device)
    }
}

impl Versions {
    pub fn current() -> Versions {
        Versions {
            appliance: env!("CARGO_PKG_VERSION").into(),
            libtorch: appliance::model::LIBTORCH_VERSION.into(),
            tch: "0.24".into(),
            wasmtime: "48".into(),
            profile: if cfg!(debug_assertions) { "debug" } else { "release" }.into(),
        }
    }
}

/// Now, as `2026-11-23 14:05 UTC`.
pub fn now_utc() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output();
    out.ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

/// CPU time (user + system) a process has used so far, in seconds, all its threads included
/// (finished ones too); `None` when `/proc` cannot tell.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".into(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on: utime is 14 and
    // stime 15, in clock ticks of USER_HZ, which is 100 on every Linux ABI.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_of_this_process_grows_with_work() {
        let before = cpu_seconds(None).expect("/proc/self/stat");
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed().as_millis() < 200 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = cpu_seconds(None).expect("/proc/self/stat");
        assert!(after - before >= 0.1, "{before} → {after}");
        assert!(cpu_seconds(Some(u32::MAX)).is_none());
    }

    #[test]
    fn the_machine_is_described() {
        let m = Machine::read("cpu".into());
        assert!(m.cores >= 1 && m.memory_gib > 0.0, "{m:?}");
        assert!(m.line().contains("model on cpu"));
    }
}
