//! With the `mkl` feature, let the binary find MKL's OpenMP runtime (`libiomp5.so`, next to
//! the static MKL libraries under `$MKLROOT/lib`) without `LD_LIBRARY_PATH`.
fn main() {
    println!("cargo:rerun-if-env-changed=MKLROOT");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_MKL").is_some() {
        if let Ok(root) = std::env::var("MKLROOT") {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{root}/lib");
        }
    }
}
