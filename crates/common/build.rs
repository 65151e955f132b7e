//! With the `tch` feature: compiles `csrc/torch_backward.cpp` (PyTorch's backward kernels that
//! tch does not bind) against the libtorch that torch-sys links, with torch-sys's ABI setting.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "tch")]
    compile_torch_backward();
}

#[cfg(feature = "tch")]
fn compile_torch_backward() {
    let source = "csrc/torch_backward.cpp";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // torch-sys (`links = "tch"`) hands its libtorch lib folder to its dependents.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report its libtorch folder (DEP_TCH_LIBTORCH_LIB)");
    // As torch-sys: LIBTORCH_INCLUDE if set, else the libtorch root above lib/.
    let root = match std::env::var_os("LIBTORCH_INCLUDE") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::path::Path::new(&lib)
            .parent()
            .expect("libtorch's lib folder has a parent")
            .to_path_buf(),
    };
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file(source)
        .compile("ldm_torch_backward");
}
