//! Makes every binary and test of this package find libtorch at run time without
//! `LD_LIBRARY_PATH`, and refuses to build against a libtorch other than 2.13.0.

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
