//! Device health for the `stats` message, read from sysfs: temperatures of the thermal zones
//! (CPU, GPU, SoC… as the kernel names them), and on Jetson the GPU load and the power rails of
//! the INA3221 monitors. Whatever a machine does not have is left out of the message (a debug
//! line says so, once), so the same binary runs on a Jetson, a laptop or a container.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// What was readable this time; empty maps and `None` are omitted from JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Thermal zone name (its `type`, e.g. `cpu-thermal`, `gpu-thermal`) → °C.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub temperature_c: BTreeMap<String, f64>,
    /// GPU busy share, 0–100 (Jetson's `load`, which counts in tenths of a percent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_load_percent: Option<f64>,
    /// Power rail (the INA3221 channel label, e.g. `VDD_GPU_SOC`) → watts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub power_w: BTreeMap<String, f64>,
}

/// Where Jetson kernels put the GPU load (JetPack 6 Orin first, then older layouts).
const GPU_LOAD_FILES: &[&str] = &[
    "sys/devices/platform/bus@0/17000000.gpu/load",
    "sys/devices/platform/17000000.gpu/load",
    "sys/devices/platform/17000000.ga10b/load",
    "sys/devices/17000000.ga10b/load",
    "sys/devices/platform/gpu.0/load",
    "sys/devices/gpu.0/load",
];

/// Reads [`Health`] under a root folder (`/` on a device; a prepared folder in tests).
#[derive(Debug)]
pub struct HealthReader {
    root: PathBuf,
    told_missing: HashSet<&'static str>,
}

impl Default for HealthReader {
    fn default() -> Self {
        Self::with_root("/")
    }
}

fn read_number(path: &Path) -> Option<f64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_text(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// Entries of a folder whose names start with `prefix`, sorted.
fn entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl HealthReader {
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            told_missing: HashSet::new(),
        }
    }

    fn missing(&mut self, what: &'static str, detail: &str) {
        if self.told_missing.insert(what) {
            log::debug!("stats: no {what} on this machine ({detail}); left out of stats");
        }
    }

    pub fn read(&mut self) -> Health {
        let mut h = Health::default();
        self.read_temperatures(&mut h);
        self.read_gpu_load(&mut h);
        self.read_power(&mut h);
        h
    }

    fn read_temperatures(&mut self, h: &mut Health) {
        let dir = self.root.join("sys/class/thermal");
        for zone in entries(&dir, "thermal_zone") {
            let Some(name) = read_text(&zone.join("type")) else {
                continue;
            };
            // Millidegrees; disabled sensors report nonsense far below freezing (Jetson: -256 °C).
            match read_number(&zone.join("temp")).map(|m| m / 1000.0) {
                Some(c) if (-40.0..=200.0).contains(&c) => {
                    h.temperature_c.insert(name.to_lowercase(), c);
                }
                _ => {}
            }
        }
        if h.temperature_c.is_empty() {
            self.missing(
                "temperatures",
                "no readable /sys/class/thermal/thermal_zone*",
            );
        }
    }

    fn read_gpu_load(&mut self, h: &mut Health) {
        h.gpu_load_percent = GPU_LOAD_FILES
            .iter()
            .find_map(|f| read_number(&self.root.join(f)))
            .map(|per_mille| (per_mille / 10.0).clamp(0.0, 100.0));
        if h.gpu_load_percent.is_none() {
            self.missing("GPU load", "no Jetson GPU load file");
        }
    }

    fn read_power(&mut self, h: &mut Health) {
        for hwmon in entries(&self.root.join("sys/class/hwmon"), "hwmon") {
            if read_text(&hwmon.join("name")).as_deref() != Some("ina3221") {
                continue;
            }
            // Channels 1–3: bus voltage (mV) and current (mA) of a labelled rail.
            for ch in 1..=3 {
                let Some(label) = read_text(&hwmon.join(format!("in{ch}_label"))) else {
                    continue;
                };
                let mv = read_number(&hwmon.join(format!("in{ch}_input")));
                let ma = read_number(&hwmon.join(format!("curr{ch}_input")));
                if let (Some(mv), Some(ma)) = (mv, ma) {
                    h.power_w.insert(label, mv * ma / 1e6);
                }
            }
        }
        if h.power_w.is_empty() {
            self.missing("power rails", "no INA3221 monitor under /sys/class/hwmon");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn a_jetson_like_tree_gives_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write(r, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n");
        write(r, "sys/class/thermal/thermal_zone0/temp", "48500\n");
        write(r, "sys/class/thermal/thermal_zone1/type", "GPU-therm\n");
        write(r, "sys/class/thermal/thermal_zone1/temp", "45250\n");
        // A disabled zone, as Jetson reports them.
        write(r, "sys/class/thermal/thermal_zone2/type", "PMIC-Die\n");
        write(r, "sys/class/thermal/thermal_zone2/temp", "-256000\n");
        write(r, "sys/devices/platform/bus@0/17000000.gpu/load", "357\n");
        write(r, "sys/class/hwmon/hwmon1/name", "ina3221\n");
        write(r, "sys/class/hwmon/hwmon1/in1_label", "VDD_GPU_SOC\n");
        write(r, "sys/class/hwmon/hwmon1/in1_input", "5000\n");
        write(r, "sys/class/hwmon/hwmon1/curr1_input", "1200\n");
        write(r, "sys/class/hwmon/hwmon1/in2_label", "VDD_CPU_CV\n");
        write(r, "sys/class/hwmon/hwmon1/in2_input", "5008\n");
        write(r, "sys/class/hwmon/hwmon1/curr2_input", "400\n");
        // Another hwmon device is not a power rail.
        write(r, "sys/class/hwmon/hwmon0/name", "nvme\n");
        write(r, "sys/class/hwmon/hwmon0/in1_label", "ignored\n");

        let h = HealthReader::with_root(r).read();
        assert_eq!(h.temperature_c.len(), 2, "{h:?}");
        assert_eq!(h.temperature_c["cpu-thermal"], 48.5);
        assert_eq!(h.temperature_c["gpu-therm"], 45.25);
        assert_eq!(h.gpu_load_percent, Some(35.7));
        assert_eq!(h.power_w.len(), 2);
        assert!((h.power_w["VDD_GPU_SOC"] - 6.0).abs() < 1e-9);
        assert!((h.power_w["VDD_CPU_CV"] - 2.0032).abs() < 1e-9);
        let json = serde_json::to_value(&h).unwrap();
        assert_eq!(json["temperature_c"]["cpu-thermal"], 48.5);
        assert_eq!(json["gpu_load_percent"], 35.7);
    }

    #[test]
    fn what_is_missing_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        // A machine with one thermal zone and nothing else.
        write(
            dir.path(),
            "sys/class/thermal/thermal_zone0/type",
            "x86_pkg_temp",
        );
        write(dir.path(), "sys/class/thermal/thermal_zone0/temp", "61000");
        let h = HealthReader::with_root(dir.path()).read();
        let json = serde_json::to_value(&h).unwrap();
        assert_eq!(json["temperature_c"]["x86_pkg_temp"], 61.0);
        assert!(json.get("gpu_load_percent").is_none(), "{json}");
        assert!(json.get("power_w").is_none(), "{json}");
        // An empty root: an empty object.
        let empty = tempfile::tempdir().unwrap();
        let h = HealthReader::with_root(empty.path()).read();
        assert_eq!(serde_json::to_string(&h).unwrap(), "{}");
    }
}
