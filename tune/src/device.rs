//! The device fingerprint: what a measurement is valid for. Two machines
//! with the same fingerprint run the same code at comparable speeds; a
//! record measured under another fingerprint is never applied.
//!
//! CPU: the architecture, the model name `/proc/cpuinfo` reports and the
//! SIMD features the kernels can use. GPU: the name, the compute
//! capability and the CUDA version the driver supports.

use crate::fnv_hex;

/// A device as the tuning database keys it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// `cpu-<12 hex digits>`: a hash of [`Device::description`].
    pub id: String,
    /// What was hashed, for people: `x86_64 | AMD EPYC 7B13 | avx,avx2,fma,...`.
    pub description: String,
}

impl Device {
    /// A CPU from its parts (features are sorted and deduplicated).
    pub fn cpu(arch: &str, model: &str, features: &[&str]) -> Device {
        let mut f: Vec<&str> = features.to_vec();
        f.sort_unstable();
        f.dedup();
        let description = format!("{arch} | {} | {}", model.trim(), f.join(","));
        Device { id: format!("cpu-{}", fnv_hex(description.as_bytes())), description }
    }

    /// A GPU from what the driver reports (`NVIDIA H200`, (9, 0), 12080).
    pub fn gpu(name: &str, compute_capability: (u32, u32), driver_version: u32) -> Device {
        let (major, minor) = compute_capability;
        let description = format!(
            "{} | sm_{major}{minor} | driver CUDA {}.{}",
            name.trim(),
            driver_version / 1000,
            driver_version % 1000 / 10
        );
        Device { id: format!("gpu-{}", fnv_hex(description.as_bytes())), description }
    }

    /// This machine's CPU.
    pub fn host_cpu() -> Device {
        Device::cpu(std::env::consts::ARCH, &cpu_model(), &host_features())
    }
}

/// The first `model name` of `/proc/cpuinfo` (Linux), else `unknown`.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model") || l.starts_with("CPU part"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

/// The SIMD features kernels may use that the host has.
fn host_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let all: [(&str, bool); 10] = [
            ("sse4.1", has!("sse4.1")),
            ("sse4.2", has!("sse4.2")),
            ("avx", has!("avx")),
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("f16c", has!("f16c")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512vl", has!("avx512vl")),
            ("avx512bf16", has!("avx512bf16")),
        ];
        all.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect()
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        let all: [(&str, bool); 3] = [("neon", has!("neon")), ("fp16", has!("fp16")), ("bf16", has!("bf16"))];
        all.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        vec![]
    }
}

/// The size of the last-level cache in bytes (Linux sysfs), or 32 MiB.
pub fn last_level_cache_bytes() -> usize {
    let mut best = 0usize;
    for i in 0..8 {
        let Ok(s) = std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size")) else {
            continue;
        };
        let s = s.trim();
        let (num, mul) = match s.strip_suffix('K') {
            Some(n) => (n, 1 << 10),
            None => match s.strip_suffix('M') {
                Some(n) => (n, 1 << 20),
                None => (s, 1),
            },
        };
        if let Ok(n) = num.parse::<usize>() {
            best = best.max(n * mul);
        }
    }
    if best == 0 {
        32 << 20
    } else {
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_depend_on_model_and_features_only() {
        let a = Device::cpu("x86_64", "AMD EPYC 7B13", &["fma", "avx2", "avx2"]);
        let b = Device::cpu("x86_64", " AMD EPYC 7B13 ", &["avx2", "fma"]);
        assert_eq!(a, b);
        assert!(a.id.starts_with("cpu-") && a.id.len() == 16, "{}", a.id);
        assert_ne!(a.id, Device::cpu("x86_64", "AMD EPYC 7B13", &["avx2"]).id);
        assert_ne!(a.id, Device::cpu("x86_64", "Intel Xeon", &["avx2", "fma"]).id);
        let h200 = Device::gpu("NVIDIA H200", (9, 0), 12080);
        assert_eq!(h200.description, "NVIDIA H200 | sm_90 | driver CUDA 12.8");
        assert!(h200.id.starts_with("gpu-") && h200.id.len() == 16, "{}", h200.id);
        assert_ne!(h200.id, Device::gpu("NVIDIA H200", (9, 0), 13000).id);
        assert_ne!(h200.id, Device::gpu("NVIDIA H100 80GB HBM3", (9, 0), 12080).id);
        let host = Device::host_cpu();
        assert_eq!(host, Device::host_cpu());
        assert!(host.description.starts_with(std::env::consts::ARCH), "{}", host.description);
    }
}
