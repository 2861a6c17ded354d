//! A library's weights in a file beside it (`NAME.weights`), for models
//! whose weights an object file cannot hold (its data is addressed within
//! 2 GB) or that the user keeps apart (`--weights beside`).
//!
//! The file is a 64-byte header (`MAGIC`, the format version, the payload's
//! size and checksum, little-endian) and the payload: each constant the
//! object reads at its offset (`object::WeightsLayout`), 64-byte aligned.
//! The C shim maps it read-only the first time a model is created, and
//! refuses it (`NAME_ERROR_WEIGHTS`, its message naming the file and the
//! fault) when it is missing, of another size, another model's, or
//! changed since it was written: checked before the first run, so a file
//! cut short is an error, not a fault in a kernel.

use crate::Error;
use egret_backends::cpu::object::{WeightsLayout, WEIGHTS_ALIGN};
use egret_backends::plan::{Plan, Storage};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"EGRETWTS";
pub const VERSION: u64 = 1;
pub const HEADER_BYTES: u64 = 64;

/// Multiplier of the checksum's lanes (FNV-1a's 64-bit prime).
const PRIME: u64 = 0x0000_0100_0000_01b3;
const SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// The payload's checksum: four lanes of FNV-1a over 8-byte words (lane i
/// takes words i, i + 4, ...), folded together. The payload is a multiple
/// of 64 bytes. Not cryptographic: it catches a truncated, damaged or
/// swapped file, at memory speed (the C shim computes the same).
#[derive(Clone)]
pub struct Checksum([u64; 4]);

impl Default for Checksum {
    fn default() -> Checksum {
        Checksum([SEED, SEED ^ 1, SEED ^ 2, SEED ^ 3])
    }
}

impl Checksum {
    /// Adds `bytes`, a multiple of 32 long.
    pub fn add(&mut self, bytes: &[u8]) {
        debug_assert_eq!(bytes.len() % 32, 0);
        for block in bytes.chunks_exact(32) {
            for (lane, word) in self.0.iter_mut().zip(block.chunks_exact(8)) {
                let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
                *lane = (*lane ^ w).wrapping_mul(PRIME);
            }
        }
    }

    pub fn finish(&self) -> u64 {
        let mut h = 0u64;
        for lane in self.0 {
            h = (h ^ lane).wrapping_mul(PRIME);
        }
        h ^ (h >> 32)
    }
}

/// Writes the weights file of `plan`'s constants laid out as `layout`;
/// returns the payload's checksum.
pub fn write(path: &Path, plan: &Plan, layout: &WeightsLayout) -> Result<u64, Error> {
    let fail = |e: std::io::Error| Error::Usage(format!("cannot write `{}`: {e}", path.display()));
    let file = std::fs::File::create(path).map_err(fail)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&[0u8; HEADER_BYTES as usize]).map_err(fail)?;
    let mut sum = Checksum::default();
    let mut at = 0u64;
    let zeros = [0u8; WEIGHTS_ALIGN as usize];
    for &(buffer, offset) in &layout.offsets {
        debug_assert_eq!(offset, at);
        let Storage::Constant(t) = &plan.buffers[buffer].storage else {
            return Err(Error::Codegen(format!("buffer {buffer} in the weights layout is not a constant")));
        };
        let bytes = t.bytes();
        let whole = bytes.len() / 32 * 32;
        sum.add(&bytes[..whole]);
        out.write_all(bytes).map_err(fail)?;
        // The tail: the last partial 32 bytes and the padding to 64.
        let padded = (bytes.len() as u64).div_ceil(WEIGHTS_ALIGN).max(1) * WEIGHTS_ALIGN;
        let mut tail = bytes[whole..].to_vec();
        tail.resize((padded as usize) - whole, 0);
        sum.add(&tail);
        out.write_all(&zeros[..padded as usize - bytes.len()]).map_err(fail)?;
        at += padded;
    }
    if at != layout.bytes {
        return Err(Error::Codegen(format!("the weights file has {at} bytes; its layout says {}", layout.bytes)));
    }
    let checksum = sum.finish();
    let mut header = [0u8; HEADER_BYTES as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&layout.bytes.to_le_bytes());
    header[24..32].copy_from_slice(&checksum.to_le_bytes());
    let mut file = out.into_inner().map_err(|e| fail(e.into_error()))?;
    file.seek(SeekFrom::Start(0)).and_then(|_| file.write_all(&header)).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    Ok(checksum)
}

/// The C shim's part: `NAME_weights`, and `weights_ready()`, which maps and
/// checks the file once per process. `checksum` is `None` for a library
/// whose weights are in its object (then the file is not needed).
pub fn c_source(name: &str, layout: Option<(&WeightsLayout, u64)>) -> String {
    let up = name.to_uppercase();
    let Some((layout, checksum)) = layout else {
        return "static int weights_ready(void) { return 0; }\nstatic const char *weights_error(void) { return \"\"; }\n".into();
    };
    format!(
        r#"/* The weights, in {name}.weights beside the library (or where the
 * environment variable {up}_WEIGHTS points), mapped at the first create. */
#define WEIGHTS_BYTES ((uint64_t){bytes}ULL)
#define WEIGHTS_CHECKSUM ((uint64_t){checksum}ULL)
const unsigned char *{name}_weights;
static char weights_message[768];
static int weights_status;
static pthread_once_t weights_once = PTHREAD_ONCE_INIT;

static void weights_fail(const char *path, const char *what) {{
    snprintf(weights_message, sizeof weights_message, "the weights file %s %s", path, what);
    weights_status = {up}_ERROR_WEIGHTS;
}}

static uint64_t weights_checksum(const unsigned char *p, uint64_t n) {{
    uint64_t lane[4] = {{{seed}ULL, {seed}ULL ^ 1, {seed}ULL ^ 2, {seed}ULL ^ 3}};
    uint64_t h = 0, i, k;
    for (i = 0; i + 32 <= n; i += 32)
        for (k = 0; k < 4; k++) {{
            uint64_t w;
            memcpy(&w, p + i + 8 * k, 8);
            lane[k] = (lane[k] ^ w) * {prime}ULL;
        }}
    for (k = 0; k < 4; k++) h = (h ^ lane[k]) * {prime}ULL;
    return h ^ (h >> 32);
}}

static void map_weights(void) {{
    char path[4096];
    const char *given = getenv("{up}_WEIGHTS");
    Dl_info self;
    struct stat st;
    unsigned char *map;
    uint64_t header[4];
    int fd;
    if (given && *given) {{
        snprintf(path, sizeof path, "%s", given);
    }} else if (dladdr((void *)&{name}_create, &self) && self.dli_fname && strrchr(self.dli_fname, '/')) {{
        int dir = (int)(strrchr(self.dli_fname, '/') - self.dli_fname + 1);
        snprintf(path, sizeof path, "%.*s{name}.weights", dir, self.dli_fname);
    }} else {{
        snprintf(path, sizeof path, "{name}.weights");
    }}
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {{
        weights_fail(path, strerror(errno));
        return;
    }}
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_size != {header_bytes}ULL + WEIGHTS_BYTES) {{
        char what[128];
        snprintf(what, sizeof what, "has %lld bytes; this library's weights are %llu", (long long)st.st_size,
                 (unsigned long long)({header_bytes}ULL + WEIGHTS_BYTES));
        close(fd);
        weights_fail(path, what);
        return;
    }}
    map = (unsigned char *)mmap(0, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {{
        weights_fail(path, strerror(errno));
        return;
    }}
    memcpy(header, map + 8, sizeof header);
    if (memcmp(map, "{magic}", 8) != 0 || header[0] != {version}ULL || header[1] != WEIGHTS_BYTES
        || header[2] != WEIGHTS_CHECKSUM) {{
        munmap(map, (size_t)st.st_size);
        weights_fail(path, "is not the weights this library was compiled with");
        return;
    }}
    if (weights_checksum(map + {header_bytes}, WEIGHTS_BYTES) != WEIGHTS_CHECKSUM) {{
        munmap(map, (size_t)st.st_size);
        weights_fail(path, "has changed since it was written (its checksum differs)");
        return;
    }}
    {name}_weights = map + {header_bytes};
}}

static int weights_ready(void) {{
    pthread_once(&weights_once, map_weights);
    return weights_status;
}}

static const char *weights_error(void) {{ return weights_message; }}
"#,
        bytes = layout.bytes,
        seed = SEED,
        prime = PRIME,
        header_bytes = HEADER_BYTES,
        magic = std::str::from_utf8(MAGIC).expect("ASCII"),
        version = VERSION,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_sees_every_word_and_its_place() {
        let bytes: Vec<u8> = (0..256u32).map(|i| (i * 7 % 251) as u8).collect();
        let of = |b: &[u8]| {
            let mut s = Checksum::default();
            s.add(b);
            s.finish()
        };
        let base = of(&bytes);
        for at in [0, 9, 100, 255] {
            let mut changed = bytes.clone();
            changed[at] ^= 1;
            assert_ne!(of(&changed), base, "a flipped bit at {at}");
        }
        // Two words swapped between lanes.
        let mut swapped = bytes.clone();
        swapped[..8].copy_from_slice(&bytes[8..16]);
        swapped[8..16].copy_from_slice(&bytes[..8]);
        assert_ne!(of(&swapped), base);
        assert_ne!(of(&bytes[..224]), base);
        // In pieces or whole, the same.
        let mut pieces = Checksum::default();
        pieces.add(&bytes[..64]);
        pieces.add(&bytes[64..]);
        assert_eq!(pieces.finish(), base);
    }
}
