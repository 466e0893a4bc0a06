//! GPU telemetry: a background thread polls NVML (through `nvml-wrapper`, which loads the
//! NVIDIA driver's library at run time) every `gpu.poll_interval_ms` and keeps the latest
//! reading for `/gpu/stats` and the `vla_gpu_*` gauges.
//!
//! Without the driver the appliance runs as usual: the monitor logs once that GPU telemetry is
//! unavailable and reports `available: false` (`vla_gpu_available 0`). A field a device does
//! not support (`NotSupported`) is left out, never reported as 0.
//!
//! Between polls the thread waits on NVML's event set for critical XID errors (Linux, devices
//! that support the event), counting each in `vla_gpu_xid_errors_total{xid}` as it happens.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, ComputeMode, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;

use crate::metrics::Metrics;

/// What NVML said about one device, in its own units; `None` where it had no answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawReading {
    pub index: u32,
    pub name: String,
    pub utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_celsius: Option<u32>,
    pub power_milliwatts: Option<u32>,
    pub energy_millijoules: Option<u64>,
    /// (clock, MHz): graphics, sm, memory.
    pub clocks_mhz: Vec<(&'static str, u32)>,
    /// Active throttle reasons, by name.
    pub throttle: Vec<&'static str>,
    /// NVML's compute mode: 0 default, 1 exclusive thread, 2 prohibited, 3 exclusive process.
    pub compute_mode: Option<u32>,
}

pub use vla_api::{GpuDevice as DeviceStats, GpuStats};

const GB: f64 = 1e9;

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Converts a reading for people (`/gpu/stats`).
pub fn device_stats(r: &RawReading) -> DeviceStats {
    let memory_utilization = match (r.memory_used_bytes, r.memory_total_bytes) {
        (Some(used), Some(total)) if total > 0 => Some(round2(used as f64 * 100.0 / total as f64)),
        _ => None,
    };
    DeviceStats {
        index: r.index,
        name: r.name.clone(),
        utilization_percent: r.utilization_percent.map(f64::from),
        memory_used_gb: r.memory_used_bytes.map(|b| round2(b as f64 / GB)),
        memory_total_gb: r.memory_total_bytes.map(|b| round2(b as f64 / GB)),
        memory_utilization_percent: memory_utilization,
        temperature_celsius: r.temperature_celsius.map(f64::from),
        power_watts: r.power_milliwatts.map(|mw| round2(f64::from(mw) / 1000.0)),
        throttle_reasons: r.throttle.iter().map(|s| s.to_string()).collect(),
    }
}

/// Sets the `vla_gpu_*` series of one reading; a field without an answer sets no series.
pub fn record(metrics: &Metrics, r: &RawReading) {
    let index = r.index.to_string();
    let labels = [index.as_str(), r.name.as_str()];
    let set = |g: &prometheus::GaugeVec, v: Option<f64>| {
        if let Some(v) = v {
            g.with_label_values(&labels).set(v);
        }
    };
    set(&metrics.gpu_utilization, r.utilization_percent.map(f64::from));
    set(&metrics.gpu_memory_used, r.memory_used_bytes.map(|b| b as f64));
    set(&metrics.gpu_memory_total, r.memory_total_bytes.map(|b| b as f64));
    set(&metrics.gpu_memory_utilization, device_stats(r).memory_utilization_percent);
    set(&metrics.gpu_temperature, r.temperature_celsius.map(f64::from));
    set(&metrics.gpu_power, r.power_milliwatts.map(|mw| f64::from(mw) / 1000.0));
    if let Some(mode) = r.compute_mode {
        metrics.gpu_compute_mode.with_label_values(&labels).set(i64::from(mode));
    }
    if let Some(mj) = r.energy_millijoules {
        let c = metrics.gpu_energy.with_label_values(&labels);
        let joules = mj as f64 / 1000.0;
        if joules > c.get() {
            c.inc_by(joules - c.get());
        }
    }
    for (clock, mhz) in &r.clocks_mhz {
        metrics.gpu_clock.with_label_values(&[labels[0], labels[1], clock]).set(f64::from(*mhz) * 1e6);
    }
    for reason in THROTTLE_REASONS {
        let active = i64::from(r.throttle.contains(&reason));
        metrics.gpu_throttle.with_label_values(&[labels[0], labels[1], reason]).set(active);
    }
}

const THROTTLE_REASONS: [&str; 6] =
    ["gpu_idle", "sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake"];

/// `Ok(None)` for a field the device does not support; other errors are errors.
fn optional<T>(r: Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(NvmlError::NotSupported) => Ok(None),
        Err(e) => Err(e),
    }
}

fn read_device(nvml: &Nvml, index: u32) -> Result<RawReading, NvmlError> {
    use nvml_wrapper::bitmasks::device::ThrottleReasons as T;
    let d = nvml.device_by_index(index)?;
    let memory = optional(d.memory_info())?;
    let mut clocks_mhz = Vec::new();
    for (name, clock) in [("graphics", Clock::Graphics), ("sm", Clock::SM), ("memory", Clock::Memory)] {
        if let Some(mhz) = optional(d.clock_info(clock))? {
            clocks_mhz.push((name, mhz));
        }
    }
    let throttle = match optional(d.current_throttle_reasons())? {
        None => Vec::new(),
        Some(t) => [
            (T::GPU_IDLE, "gpu_idle"),
            (T::SW_POWER_CAP, "sw_power_cap"),
            (T::HW_SLOWDOWN, "hw_slowdown"),
            (T::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
            (T::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
            (T::HW_POWER_BRAKE_SLOWDOWN, "hw_power_brake"),
        ]
        .into_iter()
        .filter(|(flag, _)| t.contains(*flag))
        .map(|(_, name)| name)
        .collect(),
    };
    Ok(RawReading {
        index,
        name: optional(d.name())?.unwrap_or_else(|| format!("gpu{index}")),
        utilization_percent: optional(d.utilization_rates())?.map(|u| u.gpu),
        memory_used_bytes: memory.as_ref().map(|m| m.used),
        memory_total_bytes: memory.as_ref().map(|m| m.total),
        temperature_celsius: optional(d.temperature(TemperatureSensor::Gpu))?,
        power_milliwatts: optional(d.power_usage())?,
        energy_millijoules: optional(d.total_energy_consumption())?,
        clocks_mhz,
        throttle,
        compute_mode: optional(d.compute_mode())?.map(|mode| match mode {
            ComputeMode::Default => 0,
            ComputeMode::ExclusiveThread => 1,
            ComputeMode::Prohibited => 2,
            ComputeMode::ExclusiveProcess => 3,
        }),
    })
}

/// The monitor: the latest reading, shared with the endpoints.
#[derive(Debug)]
pub struct GpuMonitor {
    latest: RwLock<GpuStats>,
}

impl GpuMonitor {
    /// Starts polling every `interval` on a thread of its own (NVML calls block). Without
    /// NVML, logs once and reports unavailable; the thread is not started.
    pub fn start(metrics: Arc<Metrics>, interval: Duration) -> Arc<GpuMonitor> {
        let unavailable = |reason: String| GpuStats {
            available: false,
            reason: Some(reason),
            devices: Vec::new(),
            updated_unix_ms: 0,
        };
        let nvml = match Nvml::init() {
            Ok(nvml) => nvml,
            Err(e) => {
                tracing::info!("GPU telemetry unavailable (NVML: {e}); vla_gpu_available is 0");
                metrics.gpu_available.set(0);
                return Arc::new(GpuMonitor { latest: RwLock::new(unavailable(format!("NVML: {e}"))) });
            }
        };
        let monitor = Arc::new(GpuMonitor { latest: RwLock::new(unavailable("no reading yet".into())) });
        let weak = Arc::downgrade(&monitor);
        let spawned = std::thread::Builder::new().name("gpu-monitor".into()).spawn(move || {
            let events = xid_events(&nvml);
            let mut logged = false;
            while let Some(monitor) = weak.upgrade() {
                let stats = match poll(&nvml, &metrics) {
                    Ok(stats) => {
                        logged = false;
                        stats
                    }
                    Err(e) => {
                        if !logged {
                            tracing::warn!("GPU telemetry: NVML failed: {e}");
                            logged = true;
                        }
                        metrics.gpu_available.set(0);
                        unavailable(format!("NVML: {e}"))
                    }
                };
                *monitor.latest.write().unwrap_or_else(std::sync::PoisonError::into_inner) = stats;
                drop(monitor);
                wait_for_xid_errors(events.as_ref(), interval, &metrics);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("GPU telemetry unavailable: cannot start its thread: {e}");
        }
        monitor
    }

    pub fn stats(&self) -> GpuStats {
        self.latest.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// An event set for critical XID errors on every device that supports them; `None` when no
/// device does (or NVML refuses), and the monitor then just sleeps between polls.
fn xid_events(nvml: &Nvml) -> Option<EventSet<'_>> {
    let mut set = nvml.create_event_set().ok()?;
    let mut registered = 0;
    for index in 0..nvml.device_count().ok()? {
        let Ok(device) = nvml.device_by_index(index) else { continue };
        if !device.supported_event_types().is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR)) {
            continue;
        }
        match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => {
                set = s;
                registered += 1;
            }
            // The set is gone with the error; XID errors go uncounted, telemetry goes on.
            Err(e) => {
                tracing::warn!("GPU telemetry: cannot watch XID errors of GPU{index}: {:?}", e.error);
                return None;
            }
        }
    }
    (registered > 0).then_some(set)
}

/// Waits `interval`, counting the XID errors NVML reports meanwhile.
fn wait_for_xid_errors(events: Option<&EventSet<'_>>, interval: Duration, metrics: &Metrics) {
    let Some(set) = events else {
        std::thread::sleep(interval);
        return;
    };
    let deadline = std::time::Instant::now() + interval;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match set.wait(u32::try_from(left.as_millis()).unwrap_or(u32::MAX).max(1)) {
            Ok(event) => {
                let index = event.device.index().unwrap_or(u32::MAX);
                let name = event.device.name().unwrap_or_else(|_| format!("gpu{index}"));
                record_xid(metrics, index, &name, event.event_data.as_ref());
            }
            Err(NvmlError::Timeout) => return,
            Err(e) => {
                tracing::debug!("GPU telemetry: waiting for XID events failed: {e}");
                std::thread::sleep(left);
                return;
            }
        }
    }
}

/// Counts one critical XID error of device `index`.
pub fn record_xid(metrics: &Metrics, index: u32, name: &str, xid: Option<&XidError>) {
    let code = match xid {
        Some(XidError::Value(code)) => code.to_string(),
        Some(XidError::Unknown) | None => "unknown".to_string(),
    };
    tracing::error!(device = index, device_name = name, xid = %code, "GPU reported a critical XID error");
    metrics.gpu_xid_errors.with_label_values(&[&index.to_string(), name, &code]).inc();
}

fn poll(nvml: &Nvml, metrics: &Metrics) -> Result<GpuStats, NvmlError> {
    let mut devices = Vec::new();
    for index in 0..nvml.device_count()? {
        let reading = read_device(nvml, index)?;
        record(metrics, &reading);
        devices.push(device_stats(&reading));
    }
    metrics.gpu_available.set(1);
    Ok(GpuStats { available: true, reason: None, devices, updated_unix_ms: crate::clock::now_ms() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn h100() -> RawReading {
        RawReading {
            index: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            utilization_percent: Some(87),
            memory_used_bytes: Some(20_000_000_000),
            memory_total_bytes: Some(80_000_000_000),
            temperature_celsius: Some(71),
            power_milliwatts: Some(312_456),
            energy_millijoules: Some(5_000_000),
            clocks_mhz: vec![("graphics", 1980), ("memory", 2619)],
            throttle: vec!["sw_power_cap"],
            compute_mode: Some(3),
        }
    }

    #[test]
    fn readings_convert_to_gb_percent_and_watts() {
        let s = device_stats(&h100());
        assert_eq!(s.memory_used_gb, Some(20.0));
        assert_eq!(s.memory_total_gb, Some(80.0));
        assert_eq!(s.memory_utilization_percent, Some(25.0));
        assert_eq!(s.power_watts, Some(312.46));
        assert_eq!(s.utilization_percent, Some(87.0));
    }

    #[test]
    fn readings_set_the_gauges_and_unsupported_fields_set_nothing() {
        let m = Metrics::new();
        let mut r = h100();
        record(&m, &r);
        let text = m.render().unwrap();
        let labels = r#"device="0",device_name="NVIDIA H100 80GB HBM3""#;
        assert!(text.contains(&format!("vla_gpu_temperature_celsius{{{labels}}} 71")), "{text}");
        assert!(text.contains(&format!("vla_gpu_memory_utilization_percent{{{labels}}} 25")));
        assert!(text.contains(&format!("vla_gpu_energy_joules_total{{{labels}}} 5000")));
        assert!(text.contains(&format!(r#"vla_gpu_throttle_active{{{labels},reason="sw_power_cap"}} 1"#)));
        assert!(text.contains(&format!(r#"vla_gpu_clock_hertz{{clock="graphics",{labels}}} 1980000000"#)), "{text}");
        assert!(text.contains(&format!("vla_gpu_compute_mode{{{labels}}} 3")), "{text}");

        let m = Metrics::new();
        r.temperature_celsius = None;
        r.power_milliwatts = None;
        record(&m, &r);
        let text = m.render().unwrap();
        assert!(!text.contains("vla_gpu_temperature_celsius{"), "{text}");
        assert!(!text.contains("vla_gpu_power_watts{"));
        assert!(device_stats(&r).temperature_celsius.is_none());
    }

    #[test]
    fn xid_errors_count_by_device_and_code() {
        let m = Metrics::new();
        record_xid(&m, 0, "NVIDIA H100 80GB HBM3", Some(&XidError::Value(79)));
        record_xid(&m, 0, "NVIDIA H100 80GB HBM3", Some(&XidError::Value(79)));
        record_xid(&m, 1, "NVIDIA H100 80GB HBM3", Some(&XidError::Unknown));
        let text = m.render().unwrap();
        let h100 = r#"device_name="NVIDIA H100 80GB HBM3""#;
        assert!(text.contains(&format!(r#"vla_gpu_xid_errors_total{{device="0",{h100},xid="79"}} 2"#)), "{text}");
        assert!(text.contains(&format!(r#"vla_gpu_xid_errors_total{{device="1",{h100},xid="unknown"}} 1"#)), "{text}");
    }

    #[test]
    fn the_monitor_reports_what_nvml_can_tell() {
        let m = Arc::new(Metrics::new());
        let monitor = GpuMonitor::start(m.clone(), Duration::from_millis(50));
        match Nvml::init() {
            // This development machine (and CI) has no NVIDIA driver: the degraded path.
            Err(_) => {
                let stats = monitor.stats();
                assert!(!stats.available);
                assert!(stats.reason.unwrap().contains("NVML"));
                assert!(m.render().unwrap().contains("vla_gpu_available 0"));
            }
            // A GPU machine: the first poll reads every device.
            Ok(nvml) => {
                let start = std::time::Instant::now();
                while monitor.stats().updated_unix_ms == 0 && start.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let stats = monitor.stats();
                assert!(stats.available, "{stats:?}");
                assert_eq!(stats.devices.len() as u32, nvml.device_count().unwrap());
                assert!(m.render().unwrap().contains("vla_gpu_available 1"));
            }
        }
    }
}
