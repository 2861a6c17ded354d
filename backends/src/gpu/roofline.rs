//! What a kernel should take on a given GPU, estimated before one runs it:
//! how many of its workgroups an SM holds at once (occupancy, from its
//! threads, workgroup memory and registers), how many waves its grid makes,
//! and the roofline's bound (its flops at the arithmetic's peak, or its
//! operands' bytes at the memory's bandwidth, whichever is longer), so the
//! first measured numbers can be read against it (`explain --backend ptx`).

use super::form::Kernel;

/// What a kernel must do at least: its floating-point operations (a
/// multiply-add counts two) and the bytes of its operands, each read or
/// written once (a lower bound on its memory traffic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub flops: u64,
    pub bytes: u64,
}

/// A GPU's limits and peaks, from its vendor's datasheet.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    pub name: &'static str,
    pub sms: u32,
    pub threads_per_sm: u32,
    pub blocks_per_sm: u32,
    pub registers_per_sm: u32,
    /// Workgroup memory per SM, and what the hardware keeps per block.
    pub shared_per_sm: u32,
    pub shared_reserved_per_block: u32,
    /// Dense peaks in flop/s: f32 FMA, and tensor cores on tf32 and bf16.
    pub f32_flops: f64,
    pub tf32_flops: f64,
    pub bf16_flops: f64,
    /// Memory bandwidth in bytes/s.
    pub bandwidth: f64,
}

/// NVIDIA H100 SXM5 (sm_90): 132 SMs, 67 TFLOP/s f32, 495 tf32 and 989
/// bf16 (dense), 3.35 TB/s of HBM3.
pub const H100_SXM: Device = Device {
    name: "H100 SXM",
    sms: 132,
    threads_per_sm: 2048,
    blocks_per_sm: 32,
    registers_per_sm: 65536,
    shared_per_sm: 228 * 1024,
    shared_reserved_per_block: 1024,
    f32_flops: 67e12,
    tf32_flops: 494.7e12,
    bf16_flops: 989.4e12,
    bandwidth: 3.35e12,
};

/// A kernel's estimate on a device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Workgroups an SM holds at once, and what limits it.
    pub blocks_per_sm: u32,
    pub limited_by: &'static str,
    /// Waves of the grid over the device's SMs at that occupancy.
    pub waves: f64,
    /// The roofline's time in seconds, and its bound ("compute" or "memory").
    pub seconds: f64,
    pub bound: &'static str,
}

/// Registers a warp takes, in the allocation units of 256 registers.
fn warp_registers(registers: u32) -> u32 {
    (registers * 32).div_ceil(256) * 256
}

/// The estimate of `kernel` over `blocks` workgroups doing `cost`, with
/// `registers` per thread where `ptxas` said (else registers are taken to
/// limit nothing). Tensor-core products (`matmul_mma_tf32`, `_bf16`) run at
/// the tensor cores' peak, everything else at f32's. A grid too small to
/// fill the SMs gets their share of the peaks.
pub fn estimate(kernel: &Kernel, blocks: u64, cost: Cost, registers: Option<u32>, device: &Device) -> Estimate {
    let threads = kernel.threads.max(1);
    let shared = kernel.shared.iter().map(|&n| n * 4).sum::<u32>();
    let mut limits = vec![
        ("blocks", device.blocks_per_sm),
        ("threads", device.threads_per_sm / threads),
        ("shared memory", device.shared_per_sm / (shared + device.shared_reserved_per_block)),
    ];
    if let Some(r) = registers {
        let per_block = warp_registers(r.max(1)) * threads.div_ceil(32);
        limits.push(("registers", device.registers_per_sm / per_block));
    }
    let (limited_by, blocks_per_sm) = limits.into_iter().min_by_key(|&(_, v)| v).expect("three limits at least");
    let resident = (device.sms * blocks_per_sm).max(1) as f64;
    let waves = blocks as f64 / resident;
    // The SMs the grid occupies, as a share of the device.
    let fill = (blocks as f64 / device.sms as f64).min(1.0);
    let peak = if kernel.name.starts_with("matmul_mma_bf16") {
        device.bf16_flops
    } else if kernel.name.starts_with("matmul_mma_tf32") {
        device.tf32_flops
    } else {
        device.f32_flops
    };
    let compute = cost.flops as f64 / (peak * fill.max(f64::MIN_POSITIVE));
    let memory = cost.bytes as f64 / (device.bandwidth * fill.max(f64::MIN_POSITIVE));
    let (seconds, bound) = if compute >= memory { (compute, "compute") } else { (memory, "memory") };
    Estimate { blocks_per_sm, limited_by, waves, seconds, bound }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(name: &str, threads: u32, shared_words: u32) -> Kernel {
        Kernel { name: name.into(), threads, vars: vec![], shared: vec![shared_words], locals: vec![], body: vec![] }
    }

    /// The occupancy's limits as the CUDA occupancy calculator gives them
    /// for sm_90, and the roofline's two sides.
    #[test]
    fn occupancy_and_the_roofline_follow_the_limits() {
        let d = H100_SXM;
        // 256 threads, 8.25 KiB of shared memory, 48 registers: 5 blocks
        // by registers (48 x 32 = 1536 a warp, 12,288 a block).
        let k = kernel("matmul_64x64", 256, 2 * 1056);
        let e = estimate(&k, 1320, Cost { flops: 2 << 30, bytes: 12 << 20 }, Some(48), &d);
        assert_eq!((e.blocks_per_sm, e.limited_by), (5, "registers"));
        assert!((e.waves - 2.0).abs() < 1e-9, "{e:?}");
        assert_eq!(e.bound, "compute");
        assert!((e.seconds - (2u64 << 30) as f64 / 67e12).abs() < 1e-12);
        // Without registers: threads limit it (2048 / 256 = 8).
        let e = estimate(&k, 1320, Cost::default(), None, &d);
        assert_eq!((e.blocks_per_sm, e.limited_by), (8, "threads"));
        // 48 KiB of shared memory: 4 a SM.
        let e = estimate(&kernel("attention", 64, 12 * 1024), 10, Cost { flops: 0, bytes: 1 << 20 }, None, &d);
        assert_eq!((e.blocks_per_sm, e.limited_by), (4, "shared memory"));
        // Ten blocks fill ten SMs: a tenth... of 132 of the bandwidth.
        assert_eq!(e.bound, "memory");
        assert!((e.seconds - (1u64 << 20) as f64 / (3.35e12 * 10.0 / 132.0)).abs() < 1e-12, "{e:?}");
        // Tensor cores' peak for their products.
        let e = estimate(&kernel("matmul_mma_bf16", 128, 2176), 264, Cost { flops: 1 << 40, bytes: 0 }, None, &d);
        assert!((e.seconds - (1u64 << 40) as f64 / 989.4e12).abs() < 1e-9, "{e:?}");
    }
}
