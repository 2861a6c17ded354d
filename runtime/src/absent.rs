//! The GPU devices of a build without them: `WgpuDevice` without the `gpu`
//! feature, `CudaDevice` without `cuda`. Each has the real one's
//! constructor, which says how to build Egret with the backend, and no
//! values, so nothing else of it can run.

#[cfg(not(feature = "cuda"))]
pub use self::cuda::CudaDevice;
#[cfg(not(feature = "gpu"))]
pub use self::wgsl::{WgpuDevice, WgpuExecutable};

#[cfg(not(feature = "gpu"))]
mod wgsl {
    use egret_backends::gpu::{GpuPlan, SymbolicGpuPlan};
    use std::convert::Infallible;
    use std::sync::Arc;

    /// The wgsl backend's device, absent from this build.
    pub struct WgpuDevice {
        pub name: String,
        pub limits: egret_backends::gpu::Limits,
        never: Infallible,
    }

    impl WgpuDevice {
        pub fn shared() -> Result<Arc<WgpuDevice>, String> {
            Err(super::absent("wgsl", "gpu"))
        }
    }

    /// A wgsl program, which this build cannot make.
    pub struct WgpuExecutable {
        never: Infallible,
    }

    impl WgpuExecutable {
        pub fn new(gpu: Arc<WgpuDevice>, _: GpuPlan, _: &[String]) -> Result<WgpuExecutable, String> {
            match gpu.never {}
        }

        pub fn symbolic(gpu: Arc<WgpuDevice>, _: SymbolicGpuPlan) -> Result<WgpuExecutable, String> {
            match gpu.never {}
        }
    }

    impl crate::Executable for WgpuExecutable {
        fn run(&self, _: Vec<egret_ir::Tensor>) -> Result<Vec<egret_ir::Tensor>, crate::RunError> {
            match self.never {}
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use crate::ptx::PtxDevice;
    use std::convert::Infallible;

    /// The CUDA driver's device, absent from this build.
    pub struct CudaDevice {
        never: Infallible,
    }

    impl CudaDevice {
        pub fn open() -> Result<CudaDevice, String> {
            Err(super::absent("ptx", "cuda"))
        }
    }

    impl PtxDevice for CudaDevice {
        type Function = Infallible;

        fn name(&self) -> String {
            match self.never {}
        }
        fn alloc(&self, _: usize) -> Result<u64, String> {
            match self.never {}
        }
        fn free(&self, _: u64) {
            match self.never {}
        }
        fn upload(&self, _: u64, _: &[u8]) -> Result<(), String> {
            match self.never {}
        }
        fn download(&self, _: u64, _: &mut [u8]) -> Result<(), String> {
            match self.never {}
        }
        fn load(&self, _: &str, _: &str) -> Result<Infallible, String> {
            match self.never {}
        }
        type Recording = Infallible;
        fn record(&self, _: &[(&Infallible, [u32; 3], u32, &[u64])]) -> Result<Option<Infallible>, String> {
            match self.never {}
        }
        fn replay(&self, _: &Infallible) -> Result<(), String> {
            match self.never {}
        }
        fn launch(&self, _: &Infallible, _: [u32; 3], _: u32, _: &[u64]) -> Result<(), String> {
            match self.never {}
        }
        fn synchronize(&self) -> Result<(), String> {
            match self.never {}
        }
    }
}

/// What a build without `feature` says when asked for `backend`.
#[cfg(not(all(feature = "gpu", feature = "cuda")))]
fn absent(backend: &str, feature: &str) -> String {
    format!(
        "this build of Egret has no {backend} backend: build it with `--features {feature}` \
         (`cargo build --release --features {feature}`, or `--all-features` for every backend)"
    )
}
