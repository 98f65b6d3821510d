//! Makes every binary and test of this package find libtorch at run time without
//! `LD_LIBRARY_PATH`, refuses to build against a libtorch other than 2.13.0, and
//! compiles the c10d shim (`csrc/`, the collectives) against that libtorch's headers.

use std::path::PathBuf;

const EXPECTED_TORCH: &str = "2.13.0";

fn main() {
    // torch-sys (links = "tch") exports the directory it linked against.
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not report a libtorch directory; run `bash scripts/setup.sh` first");
    };
    let lib_dir = PathBuf::from(lib_dir);
    check_version(&lib_dir);
    // tch's own link arguments do not reach our binaries: add the run path ourselves, and
    // keep libtorch (and through it libtorch_cuda on GPU wheels) even though no symbol
    // of ours refers to it directly.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    compile_c10d_shim(&lib_dir);
}

/// Compiles `csrc/c10d_shim.cpp` (TCPStore, PrefixStore, ProcessGroupGloo and, with the
/// `nccl` feature, ProcessGroupNCCL). Its symbols live in libtorch_cpu/libc10 (and
/// libtorch_cuda for NCCL), which torch-sys already links.
fn compile_c10d_shim(lib_dir: &std::path::Path) {
    let torch_dir = lib_dir.parent().unwrap_or(lib_dir);
    let include = torch_dir.join("include");
    for file in ["csrc/c10d_shim.cpp", "csrc/c10d_shim.h", "csrc/gloo_decls"] {
        println!("cargo:rerun-if-changed={file}");
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++17")
        // Glue code: -O1 without debug info compiles in about half the time of the
        // profile's defaults (libtorch's headers dominate) and runs no slower.
        .opt_level(1)
        .debug(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // The wheel ships no gloo headers: our declarations of the few gloo types.
        .include("csrc/gloo_decls")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        // PyTorch's headers use a few C++20 niceties that g++ accepts in C++17 mode.
        .flag_if_supported("-Wno-c++20-extensions")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-interference-size")
        .file("csrc/c10d_shim.cpp");
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        // The CUDA and NCCL headers come from the wheel's nvidia-* pip packages
        // (nvidia-cuda-crt and nvidia-cuda-cccl are added by scripts/setup.sh).
        let nvidia = torch_dir.parent().unwrap_or(torch_dir).join("nvidia");
        for dir in ["cu13/include", "cu13/include/cccl", "nccl/include"] {
            let dir = nvidia.join(dir);
            if !dir.is_dir() {
                panic!(
                    "the nccl feature needs the CUDA/NCCL headers of the torch wheel's nvidia pip packages, and {} is missing; run `bash scripts/setup.sh`",
                    dir.display()
                );
            }
            build.include(dir);
        }
        build
            .define("USE_C10D_NCCL", None)
            .define("HSAT_WITH_NCCL", None);
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-lc10_cuda");
    }
    build.compile("hsat_c10d");
}

/// The wheel has no `build-version` file, so torch-sys checks nothing; `version.py` does.
fn check_version(lib_dir: &std::path::Path) {
    let torch_dir = lib_dir.parent().unwrap_or(lib_dir);
    let version_py = torch_dir.join("version.py");
    println!("cargo:rerun-if-changed={}", version_py.display());
    let text = std::fs::read_to_string(&version_py).unwrap_or_else(|err| {
        panic!(
            "cannot read {} ({err}): LIBTORCH must point at the `torch` folder of a PyTorch {EXPECTED_TORCH} install; run `bash scripts/setup.sh`",
            version_py.display()
        )
    });
    let found = text
        .lines()
        .find_map(|line| line.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"'))
        .map(|v| v.split('+').next().unwrap_or(v).to_owned())
        .unwrap_or_default();
    if found != EXPECTED_TORCH {
        panic!(
            "libtorch at {} is version {found:?}, hsat needs {EXPECTED_TORCH} (the version tch 0.26 binds); run `bash scripts/setup.sh`, which installs it",
            torch_dir.display()
        );
    }
}
