//! Admission: a slice is admitted only if its own numbers make sense and the guarantees of all
//! slices on its GPU still fit the GPU.
use crate::config::GpuConfig;
use crate::slice::{format_bytes, SliceSpec};

/// Largest weight accepted.
pub const MAX_WEIGHT: u32 = 10_000;

/// Why a slice is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// The name does not match `[a-z0-9][a-z0-9-]{0,62}`.
    #[error("Slice name {0:?} is invalid: use 1 to 63 lowercase letters, digits and dashes, starting with a letter or digit.")]
    InvalidName(String),
    /// The tenant is empty.
    #[error("Slice {0} has no tenant.")]
    NoTenant(String),
    /// The GPU is not configured.
    #[error("GPU {gpu} does not exist; this host has {known}.")]
    NoSuchGpu {
        /// The GPU asked for.
        gpu: u32,
        /// The configured GPUs, in words.
        known: String,
    },
    /// A percentage above 100.
    #[error("Slice {name} asks {what} of {pct}%; the most is 100%.")]
    PctTooLarge {
        /// Slice name.
        name: String,
        /// Which percentage.
        what: &'static str,
        /// Its value.
        pct: u32,
    },
    /// A maximum of 0 %.
    #[error("Slice {0} asks a compute maximum of 0%; it could never run.")]
    ZeroMax(String),
    /// Guarantee above maximum.
    #[error("Slice {name} asks a compute guarantee of {guarantee}%, above its maximum of {max}%.")]
    GuaranteeAboveMax {
        /// Slice name.
        name: String,
        /// Guaranteed %.
        guarantee: u32,
        /// Maximum %.
        max: u32,
    },
    /// Weight out of range.
    #[error("Slice {name} asks a weight of {weight}; weights go from 1 to {MAX_WEIGHT}.")]
    BadWeight {
        /// Slice name.
        name: String,
        /// The weight.
        weight: u32,
    },
    /// Memory guarantee above the limit.
    #[error(
        "Slice {name} asks a memory guarantee of {guarantee}, above its memory limit of {limit}."
    )]
    MemoryGuaranteeAboveLimit {
        /// Slice name.
        name: String,
        /// The guarantee, formatted.
        guarantee: String,
        /// The limit, formatted.
        limit: String,
    },
    /// Memory limit above the GPU's memory.
    #[error("GPU {gpu} has {gpu_memory} of memory; slice {name} asks a limit of {limit}.")]
    LimitAboveGpu {
        /// The GPU.
        gpu: u32,
        /// Its memory, formatted.
        gpu_memory: String,
        /// Slice name.
        name: String,
        /// The limit, formatted.
        limit: String,
    },
    /// Compute guarantees would oversubscribe the GPU.
    #[error("GPU {gpu} has {left}% of compute left to guarantee; slice {name} asks {asks}%.")]
    ComputeOversubscribed {
        /// The GPU.
        gpu: u32,
        /// Compute % not yet guaranteed to other slices.
        left: u32,
        /// Slice name.
        name: String,
        /// Its guarantee.
        asks: u32,
    },
    /// Memory guarantees would oversubscribe the GPU.
    #[error("GPU {gpu} has {left} of memory left to guarantee; slice {name} asks {asks}.")]
    MemoryOversubscribed {
        /// The GPU.
        gpu: u32,
        /// Memory not yet guaranteed, formatted.
        left: String,
        /// Slice name.
        name: String,
        /// Its guarantee, formatted.
        asks: String,
    },
    /// Another slice has the name.
    #[error("Slice {0} already exists.")]
    NameTaken(String),
}

impl AdmissionError {
    /// True when the request is well-formed but conflicts with the host or other slices (HTTP
    /// 409); false when the request itself is bad (HTTP 400).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            AdmissionError::LimitAboveGpu { .. }
                | AdmissionError::ComputeOversubscribed { .. }
                | AdmissionError::MemoryOversubscribed { .. }
                | AdmissionError::NameTaken(_)
        )
    }
}

/// Whether `name` matches `[a-z0-9][a-z0-9-]{0,62}`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty() && b.len() <= 63 && ok(&b[0]) && b[1..].iter().all(|c| ok(c) || *c == b'-')
}

fn describe_gpus(gpus: &[GpuConfig]) -> String {
    match gpus {
        [] => "no GPUs".to_string(),
        [one] => format!("only GPU {}", one.index),
        many => {
            let list: Vec<String> = many.iter().map(|g| g.index.to_string()).collect();
            format!("GPUs {}", list.join(", "))
        }
    }
}

/// Checks `spec` on its own and against `others` (every other slice on the host, not including
/// an older version of `spec` itself). Name collisions are the caller's business.
pub fn check<'a>(
    spec: &SliceSpec,
    gpus: &[GpuConfig],
    others: impl IntoIterator<Item = &'a SliceSpec>,
) -> Result<(), AdmissionError> {
    let name = spec.name.clone();
    if !valid_name(&spec.name) {
        return Err(AdmissionError::InvalidName(name));
    }
    if spec.tenant.trim().is_empty() {
        return Err(AdmissionError::NoTenant(name));
    }
    let gpu =
        gpus.iter()
            .find(|g| g.index == spec.gpu)
            .ok_or_else(|| AdmissionError::NoSuchGpu {
                gpu: spec.gpu,
                known: describe_gpus(gpus),
            })?;
    for (what, pct) in [
        ("a compute guarantee", spec.compute_guarantee_pct),
        ("a compute maximum", spec.compute_max_pct),
    ] {
        if pct > 100 {
            return Err(AdmissionError::PctTooLarge { name, what, pct });
        }
    }
    if spec.compute_max_pct == 0 {
        return Err(AdmissionError::ZeroMax(name));
    }
    if spec.compute_guarantee_pct > spec.compute_max_pct {
        return Err(AdmissionError::GuaranteeAboveMax {
            name,
            guarantee: spec.compute_guarantee_pct,
            max: spec.compute_max_pct,
        });
    }
    if spec.weight == 0 || spec.weight > MAX_WEIGHT {
        return Err(AdmissionError::BadWeight {
            name,
            weight: spec.weight,
        });
    }
    if spec.memory_guarantee > spec.memory_limit {
        return Err(AdmissionError::MemoryGuaranteeAboveLimit {
            name,
            guarantee: format_bytes(spec.memory_guarantee),
            limit: format_bytes(spec.memory_limit),
        });
    }
    if spec.memory_limit > gpu.memory {
        return Err(AdmissionError::LimitAboveGpu {
            gpu: gpu.index,
            gpu_memory: format_bytes(gpu.memory),
            name,
            limit: format_bytes(spec.memory_limit),
        });
    }
    let (mut compute, mut memory) = (0u64, 0u64);
    for o in others.into_iter().filter(|o| o.gpu == spec.gpu) {
        compute += u64::from(o.compute_guarantee_pct);
        memory = memory.saturating_add(o.memory_guarantee);
    }
    let compute_left = 100u64.saturating_sub(compute);
    if u64::from(spec.compute_guarantee_pct) > compute_left {
        return Err(AdmissionError::ComputeOversubscribed {
            gpu: gpu.index,
            left: u32::try_from(compute_left).unwrap_or(0),
            name,
            asks: spec.compute_guarantee_pct,
        });
    }
    let memory_left = gpu.memory.saturating_sub(memory);
    if spec.memory_guarantee > memory_left {
        return Err(AdmissionError::MemoryOversubscribed {
            gpu: gpu.index,
            left: format_bytes(memory_left),
            name,
            asks: format_bytes(spec.memory_guarantee),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slice::SliceClass;

    const GIB: u64 = 1 << 30;

    fn gpus() -> Vec<GpuConfig> {
        vec![
            GpuConfig {
                index: 0,
                memory: 80 * GIB,
            },
            GpuConfig {
                index: 1,
                memory: 40 * GIB,
            },
        ]
    }

    fn spec(name: &str, gpu: u32, pct: u32, mem: u64) -> SliceSpec {
        SliceSpec {
            name: name.into(),
            tenant: "acme".into(),
            gpu,
            class: SliceClass::BestEffort,
            compute_guarantee_pct: pct,
            compute_max_pct: 100,
            memory_guarantee: mem,
            memory_limit: 40 * GIB,
            weight: 1,
            attach: false,
        }
    }

    #[test]
    fn admission_accepts_guarantees_that_fill_the_gpu_exactly() {
        let others = [spec("a", 0, 70, 40 * GIB)];
        assert_eq!(check(&spec("b", 0, 30, 40 * GIB), &gpus(), &others), Ok(()));
    }

    #[test]
    fn admission_refuses_compute_oversubscription_naming_gpu_and_numbers() {
        let others = [
            spec("a", 0, 50, 0),
            spec("b", 0, 20, 0),
            spec("c", 1, 90, 0),
        ];
        let e = check(&spec("lc", 0, 50, 0), &gpus(), &others).unwrap_err();
        assert!(e.is_conflict());
        assert_eq!(
            e.to_string(),
            "GPU 0 has 30% of compute left to guarantee; slice lc asks 50%."
        );
    }

    #[test]
    fn admission_refuses_memory_oversubscription() {
        let others = [spec("a", 1, 0, 30 * GIB)];
        let e = check(&spec("b", 1, 0, 20 * GIB), &gpus(), &others).unwrap_err();
        assert_eq!(
            e.to_string(),
            "GPU 1 has 10 GiB of memory left to guarantee; slice b asks 20 GiB."
        );
    }

    #[test]
    fn admission_refuses_guarantee_above_max_as_bad_input() {
        let mut s = spec("a", 0, 60, 0);
        s.compute_max_pct = 50;
        let e = check(&s, &gpus(), []).unwrap_err();
        assert!(!e.is_conflict());
        assert_eq!(
            e.to_string(),
            "Slice a asks a compute guarantee of 60%, above its maximum of 50%."
        );
    }

    #[test]
    fn admission_refuses_memory_guarantee_above_limit_and_limit_above_gpu() {
        let mut s = spec("a", 1, 0, 41 * GIB);
        assert!(matches!(
            check(&s, &gpus(), []),
            Err(AdmissionError::MemoryGuaranteeAboveLimit { .. })
        ));
        s.memory_guarantee = 0;
        s.memory_limit = 41 * GIB;
        let e = check(&s, &gpus(), []).unwrap_err();
        assert_eq!(
            e.to_string(),
            "GPU 1 has 40 GiB of memory; slice a asks a limit of 41 GiB."
        );
    }

    #[test]
    fn admission_refuses_unknown_gpu_bad_names_and_weights() {
        let e = check(&spec("a", 7, 0, 0), &gpus(), []).unwrap_err();
        assert_eq!(
            e.to_string(),
            "GPU 7 does not exist; this host has GPUs 0, 1."
        );
        for bad in ["", "Upper", "-dash", "has space", &"x".repeat(64)] {
            assert_eq!(
                check(&spec(bad, 0, 0, 0), &gpus(), []),
                Err(AdmissionError::InvalidName(bad.to_string()))
            );
        }
        assert!(valid_name("a"));
        assert!(valid_name(&"x".repeat(63)));
        let mut s = spec("a", 0, 0, 0);
        s.weight = 0;
        assert!(matches!(
            check(&s, &gpus(), []),
            Err(AdmissionError::BadWeight { .. })
        ));
    }

    #[test]
    fn admission_refuses_percentages_above_100_and_zero_max() {
        let mut s = spec("a", 0, 0, 0);
        s.compute_max_pct = 101;
        assert_eq!(
            check(&s, &gpus(), []).unwrap_err().to_string(),
            "Slice a asks a compute maximum of 101%; the most is 100%."
        );
        s.compute_max_pct = 0;
        assert_eq!(
            check(&s, &gpus(), []),
            Err(AdmissionError::ZeroMax("a".into()))
        );
    }

    #[test]
    fn admission_counts_only_slices_on_the_same_gpu() {
        let others = [spec("a", 1, 100, 40 * GIB)];
        assert_eq!(
            check(&spec("b", 0, 100, 40 * GIB), &gpus(), &others),
            Ok(())
        );
    }
}
