//! Compiles the control-plane protocol (`proto/proto/hsat/v1/hsat.proto`) into a
//! client of its own for the security scenarios: they call the coordinator as any
//! third-party gRPC client would, setting (or leaving out, or forging) the metadata
//! by hand, and see the raw status codes.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/proto");
    let descriptors = protox::compile(["hsat/v1/hsat.proto"], ["../proto/proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
