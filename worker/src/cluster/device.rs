//! Which device a worker (or a single-process run) trains on: `--device
//! auto|cpu|cuda|cuda:N`, else `HSAT_DEVICE` (same values), else `auto`.
//!
//! `auto`: `cuda:$LOCAL_RANK` when `LOCAL_RANK` is set and the machine has GPUs
//! (one worker process per GPU of a pod, as torchrun numbers them), else `cuda:0`
//! when there is a GPU, else the CPU. `cuda` is `auto` that insists on a GPU.
//! Without this every worker process of a multi-GPU node would pick `cuda:0`.
//!
//! The choice is a pure function of the flag, the two variables and the number of
//! GPUs ([`select_device`]), so it is tested without a GPU; [`gpu_count`] asks
//! libtorch.

use tch::Device;

/// The environment variable holding a device (`--device` wins over it).
pub const DEVICE_ENV: &str = "HSAT_DEVICE";
/// The environment variable of the process's index on its machine (torchrun,
/// Kubernetes pods that run one worker process per GPU).
pub const LOCAL_RANK_ENV: &str = "LOCAL_RANK";

/// A device as written on the command line or in `HSAT_DEVICE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// `auto`: see the module docs.
    Auto,
    /// `cpu`.
    Cpu,
    /// `cuda`: a GPU, chosen as `auto` would (`LOCAL_RANK`, else 0).
    Cuda,
    /// `cuda:N`.
    CudaIndex(usize),
}

/// Why no device could be chosen; each says where the bad value came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Not one of the accepted spellings.
    #[error("{origin} = {text:?} is not a device: use auto, cpu, cuda or cuda:N (N = 0, 1, ...)")]
    Invalid {
        /// `--device` or `HSAT_DEVICE`.
        origin: &'static str,
        /// What was given.
        text: String,
    },
    /// `LOCAL_RANK` is not a number.
    #[error(
        "LOCAL_RANK = {text:?} is not a non-negative integer; unset it or pass --device explicitly"
    )]
    LocalRank {
        /// What was given.
        text: String,
    },
    /// A GPU was asked for on a machine (or a build) without one.
    #[error(
        "{requested} requested ({origin}), but CUDA is not available here (no GPU, no driver, or \
         a CPU-only libtorch); use --device cpu, or run on a GPU node"
    )]
    NoGpu {
        /// The request, e.g. `cuda:1`.
        requested: String,
        /// Where it came from.
        origin: &'static str,
    },
    /// A GPU index the machine does not have.
    #[error(
        "{requested} requested ({origin}), this machine has {gpus} GPU{plural} (cuda:0 ..= cuda:{last}); \
         ask for fewer worker processes per node or one GPU per process (resources.limits nvidia.com/gpu)",
        plural = if *gpus == 1 { "" } else { "s" },
        last = gpus.saturating_sub(1)
    )]
    Beyond {
        /// The request, e.g. `cuda:3`.
        requested: String,
        /// Where it came from.
        origin: &'static str,
        /// GPUs present.
        gpus: usize,
    },
}

impl std::str::FromStr for DeviceRequest {
    type Err = ();
    fn from_str(text: &str) -> Result<Self, ()> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceRequest::CudaIndex)
                .ok_or(()),
        }
    }
}

/// The chosen device and, for the log, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceChoice {
    /// Where to train.
    pub device: Device,
    /// `--device cuda:1`, `HSAT_DEVICE=cpu`, `auto: LOCAL_RANK=1`, ...
    pub reason: String,
}

/// Chooses the device from `flag` (`--device`), then `env(HSAT_DEVICE)`, then
/// `auto`, on a machine with `gpus` GPUs; `env` reads the process environment in
/// production (a map in tests).
pub fn select_device(
    flag: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
    gpus: usize,
) -> Result<DeviceChoice, DeviceError> {
    let from_env = env(DEVICE_ENV).filter(|value| !value.trim().is_empty());
    let (text, origin) = match (flag, &from_env) {
        (Some(flag), _) => (flag.to_owned(), "--device"),
        (None, Some(value)) => (value.clone(), DEVICE_ENV),
        (None, None) => ("auto".to_owned(), "default"),
    };
    let request: DeviceRequest = text.parse().map_err(|()| DeviceError::Invalid {
        origin,
        text: text.clone(),
    })?;
    let local_rank = match env(LOCAL_RANK_ENV).filter(|value| !value.trim().is_empty()) {
        Some(value) => Some(
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| DeviceError::LocalRank { text: value })?,
        ),
        None => None,
    };
    let gpu = |index: usize, why: String| {
        if gpus == 0 {
            return Err(DeviceError::NoGpu {
                requested: format!("cuda:{index}"),
                origin,
            });
        }
        if index >= gpus {
            return Err(DeviceError::Beyond {
                requested: format!("cuda:{index}"),
                origin,
                gpus,
            });
        }
        Ok(DeviceChoice {
            device: Device::Cuda(index),
            reason: why,
        })
    };
    let named = |what: &str| {
        if origin == "--device" {
            format!("--device {what}")
        } else {
            format!("{origin}={what}")
        }
    };
    match request {
        DeviceRequest::Cpu => Ok(DeviceChoice {
            device: Device::Cpu,
            reason: named("cpu"),
        }),
        DeviceRequest::CudaIndex(index) => gpu(index, named(&format!("cuda:{index}"))),
        DeviceRequest::Cuda => match local_rank {
            Some(rank) => gpu(rank, format!("{} with LOCAL_RANK={rank}", named("cuda"))),
            None => gpu(0, named("cuda")),
        },
        DeviceRequest::Auto => match (local_rank, gpus) {
            (_, 0) => Ok(DeviceChoice {
                device: Device::Cpu,
                reason: "auto: no GPU".to_owned(),
            }),
            (Some(rank), _) => gpu(rank, format!("auto: LOCAL_RANK={rank}")),
            (None, _) => gpu(0, format!("auto: {gpus} GPU(s), none chosen by LOCAL_RANK")),
        },
    }
}

/// GPUs libtorch sees (0 without CUDA).
pub fn gpu_count() -> usize {
    if tch::Cuda::is_available() {
        usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
    } else {
        0
    }
}

/// [`select_device`] on this process's flag and environment and this machine's GPUs.
pub fn device_from_process(flag: Option<&str>) -> Result<DeviceChoice, DeviceError> {
    select_device(flag, |key| std::env::var(key).ok(), gpu_count())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |key| map.get(key).cloned()
    }

    fn device(flag: Option<&str>, pairs: &[(&str, &str)], gpus: usize) -> Device {
        select_device(flag, env(pairs), gpus)
            .unwrap_or_else(|e| panic!("{e}"))
            .device
    }

    #[test]
    fn auto_uses_local_rank_then_the_first_gpu_then_the_cpu() {
        assert_eq!(device(None, &[], 0), Device::Cpu);
        assert_eq!(device(None, &[], 4), Device::Cuda(0));
        assert_eq!(device(None, &[("LOCAL_RANK", "3")], 4), Device::Cuda(3));
        assert_eq!(
            device(Some("auto"), &[("LOCAL_RANK", "1")], 2),
            Device::Cuda(1)
        );
        // torchrun-style LOCAL_RANK on a CPU machine: the CPU.
        assert_eq!(device(None, &[("LOCAL_RANK", "1")], 0), Device::Cpu);
    }

    #[test]
    fn the_flag_wins_over_hsat_device_which_wins_over_auto() {
        let both = [("HSAT_DEVICE", "cuda:1"), ("LOCAL_RANK", "0")];
        assert_eq!(device(Some("cpu"), &both, 2), Device::Cpu);
        assert_eq!(device(None, &both, 2), Device::Cuda(1));
        assert_eq!(device(None, &[("HSAT_DEVICE", " CPU ")], 2), Device::Cpu);
        assert_eq!(device(None, &[("HSAT_DEVICE", "")], 2), Device::Cuda(0));
        assert_eq!(
            device(Some("cuda"), &[("LOCAL_RANK", "1")], 2),
            Device::Cuda(1)
        );
        assert_eq!(device(Some("cuda"), &[], 2), Device::Cuda(0));
        let choice = select_device(None, env(&[("LOCAL_RANK", "1")]), 2).unwrap();
        assert_eq!(choice.reason, "auto: LOCAL_RANK=1");
    }

    #[test]
    fn a_gpu_beyond_the_machine_is_refused_naming_the_count() {
        let err = select_device(Some("cuda:3"), env(&[]), 2).unwrap_err();
        assert_eq!(
            err,
            DeviceError::Beyond {
                requested: "cuda:3".into(),
                origin: "--device",
                gpus: 2
            }
        );
        let text = err.to_string();
        assert!(
            text.starts_with("cuda:3 requested (--device), this machine has 2 GPUs"),
            "{text}"
        );
        // LOCAL_RANK beyond the GPUs (more processes than GPUs on the pod).
        let err = select_device(None, env(&[("LOCAL_RANK", "2")]), 2).unwrap_err();
        assert!(
            matches!(&err, DeviceError::Beyond { requested, origin: "default", gpus: 2 } if requested == "cuda:2"),
            "{err:?}"
        );
    }

    #[test]
    fn a_gpu_on_a_machine_without_one_and_bad_spellings_are_refused() {
        let err = select_device(None, env(&[("HSAT_DEVICE", "cuda:0")]), 0).unwrap_err();
        assert!(
            matches!(&err, DeviceError::NoGpu { requested, origin: "HSAT_DEVICE" } if requested == "cuda:0"),
            "{err:?}"
        );
        for bad in ["cuda:", "cuda:-1", "tpu", "cuda:x"] {
            let err = select_device(Some(bad), env(&[]), 1).unwrap_err();
            assert!(
                matches!(&err, DeviceError::Invalid { origin: "--device", text } if text == bad),
                "{bad}: {err:?}"
            );
        }
        let err = select_device(None, env(&[("LOCAL_RANK", "one")]), 1).unwrap_err();
        assert_eq!(err, DeviceError::LocalRank { text: "one".into() });
    }
}
