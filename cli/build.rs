//! The `hsat` binary links libtorch through hsat-worker: give it libtorch's run path so
//! it starts without `LD_LIBRARY_PATH` (tch's own link arguments do not reach binaries).

fn main() {
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report a libtorch directory; run `bash scripts/setup.sh` first");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-L{lib_dir}");
    println!("cargo:rustc-link-arg=-ltorch");
}
