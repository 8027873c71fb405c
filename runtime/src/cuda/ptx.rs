//! Which of a plan's PTX modules a GPU runs: the newest architecture the
//! device can JIT. Plain `sm_XY` PTX runs on any device of compute
//! capability X.Y or higher (the driver compiles it forward);
//! arch-specific `sm_XYa` PTX (wgmma, TMA, setmaxnreg) runs on exactly
//! X.Y. For a 9.0 device that means `sm_90a`, else `sm_90`, else `sm_80`;
//! a module for a newer architecture than the device is never chosen.

use std::fmt;
use std::str::FromStr;

use super::CudaError;
use crate::plan::PtxModule;

/// A GPU architecture as `ptxas -arch` spells it (`sm_90a`: 9.0,
/// arch-specific).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SmArch {
    pub major: u32,
    pub minor: u32,
    /// The `a` suffix: features of exactly this architecture.
    pub specific: bool,
}

impl SmArch {
    /// A device of compute capability `major.minor` as its arch (not specific).
    pub fn of_device(major: u32, minor: u32) -> SmArch {
        SmArch { major, minor, specific: false }
    }

    /// Whether a device of this compute capability can load PTX for `ptx`.
    pub fn runs(self, ptx: SmArch) -> bool {
        let (dev, p) = ((self.major, self.minor), (ptx.major, ptx.minor));
        if ptx.specific {
            dev == p
        } else {
            p <= dev
        }
    }
}

impl fmt::Display for SmArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}{}", self.major, self.minor, if self.specific { "a" } else { "" })
    }
}

impl FromStr for SmArch {
    type Err = String;

    fn from_str(s: &str) -> Result<SmArch, String> {
        let bad = || format!("`{s}` is not a GPU architecture (expected sm_XY or sm_XYa, e.g. sm_90a)");
        let rest = s.strip_prefix("sm_").ok_or_else(bad)?;
        let (digits, specific) = match rest.strip_suffix('a') {
            Some(d) => (d, true),
            None => (rest, false),
        };
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        let major: u32 = major.parse().map_err(|_| bad())?;
        let minor: u32 = minor.parse().map_err(|_| bad())?;
        if major == 0 {
            return Err(bad());
        }
        Ok(SmArch { major, minor, specific })
    }
}

/// Parses every module's architecture (a plan error names the bad one).
pub fn parse_archs(modules: &[PtxModule]) -> Result<Vec<SmArch>, CudaError> {
    if modules.is_empty() {
        return Err(CudaError::Plan("the plan has no PTX modules (is it a `cuda` plan?)".into()));
    }
    modules
        .iter()
        .map(|m| m.arch.parse::<SmArch>().map_err(|e| CudaError::Plan(format!("PTX module `{}`: {e}", m.file))))
        .collect()
}

/// The index of the module a device of compute capability `major.minor`
/// should load: the newest it can run, arch-specific before plain.
pub fn choose_module(modules: &[PtxModule], major: u32, minor: u32) -> Result<usize, CudaError> {
    let archs = parse_archs(modules)?;
    let device = SmArch::of_device(major, minor);
    archs
        .iter()
        .enumerate()
        .filter(|(_, &a)| device.runs(a))
        .max_by_key(|(i, &a)| (a.major, a.minor, a.specific, std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
        .ok_or_else(|| CudaError::NoModule {
            device: device.to_string(),
            available: modules.iter().map(|m| m.arch.clone()).collect(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(archs: &[&str]) -> Vec<PtxModule> {
        archs.iter().map(|a| PtxModule { arch: a.to_string(), file: format!("kernels.{a}.ptx") }).collect()
    }

    #[test]
    fn archs_parse_and_print() {
        let a: SmArch = "sm_90a".parse().unwrap();
        assert_eq!(a, SmArch { major: 9, minor: 0, specific: true });
        assert_eq!(a.to_string(), "sm_90a");
        assert_eq!("sm_100".parse::<SmArch>().unwrap(), SmArch { major: 10, minor: 0, specific: false });
        assert_eq!("sm_86".parse::<SmArch>().unwrap().to_string(), "sm_86");
        for bad in ["sm90", "sm_9", "sm_", "compute_90", "sm_9x", "sm_90b", "sm_05", ""] {
            assert!(bad.parse::<SmArch>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_newest_module_the_device_runs_is_chosen() {
        let all = modules(&["sm_80", "sm_90", "sm_90a"]);
        let pick = |m: &[PtxModule], major, minor| choose_module(m, major, minor).map(|i| m[i].arch.clone());
        // H100/H200: the arch-specific module.
        assert_eq!(pick(&all, 9, 0).unwrap(), "sm_90a");
        // Without it, plain sm_90, then sm_80.
        assert_eq!(pick(&modules(&["sm_90", "sm_80"]), 9, 0).unwrap(), "sm_90");
        assert_eq!(pick(&modules(&["sm_80"]), 9, 0).unwrap(), "sm_80");
        // A100 and RTX 30xx: sm_80 (sm_90 and sm_90a are newer).
        assert_eq!(pick(&all, 8, 0).unwrap(), "sm_80");
        assert_eq!(pick(&all, 8, 6).unwrap(), "sm_80");
        // Blackwell JITs plain sm_90 forward but not sm_90a.
        assert_eq!(pick(&all, 10, 0).unwrap(), "sm_90");
        assert_eq!(
            pick(&modules(&["sm_90a"]), 10, 0).unwrap_err().to_string(),
            CudaError::NoModule { device: "sm_100".into(), available: vec!["sm_90a".into()] }.to_string()
        );
    }

    #[test]
    fn modules_newer_than_the_device_are_refused_clearly() {
        let e = choose_module(&modules(&["sm_90a", "sm_90"]), 8, 6).unwrap_err();
        assert!(matches!(&e, CudaError::NoModule { device, .. } if device == "sm_86"), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("sm_90a, sm_90") && msg.contains("sm_86"), "{msg}");
        let e = choose_module(&[], 9, 0).unwrap_err();
        assert!(e.to_string().contains("no PTX modules"), "{e}");
        let e = choose_module(&modules(&["sm_90", "gfx942"]), 9, 0).unwrap_err();
        assert!(e.to_string().contains("`gfx942` is not a GPU architecture"), "{e}");
    }
}
