//! A tensor's elements: a vector it owns, or a range of a file mapped into
//! memory (a weight read where it lies in the model or its external data).
//!
//! A mapped `Buf` reads like a slice and copies nothing until someone
//! writes to it (`DerefMut` makes it owned first) or asks for a vector.
//! Clones share the range. When the last clone of a range goes, its whole
//! pages are handed back to the kernel (`madvise(MADV_DONTNEED)`), so a
//! weight that a backend packed and then dropped leaves the resident set
//! as a freed vector would: mapped pages otherwise stay resident for as
//! long as anything else in the same file is still mapped.
//!
//! The mapping is private and read-only. The file must not shrink while
//! tensors read from it are alive: the importer checks every range
//! against the file's size when it maps it, as onnxruntime does, but a
//! file cut afterwards faults like any mapped file.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// A file mapped read-only, shared by the ranges read from it.
pub type Mapping = memmap2::Mmap;

/// Maps `file` read-only and privately, `None` where it cannot be mapped
/// (an empty file, a file system without mappings); callers read instead.
pub fn map_file(file: &std::fs::File) -> Option<Arc<Mapping>> {
    if file.metadata().ok()?.len() == 0 {
        return None;
    }
    // Safety: a private, read-only mapping. Egret never writes through it;
    // a file changed on disk while mapped is the documented limit above.
    unsafe { memmap2::Mmap::map(file) }.ok().map(Arc::new)
}

/// A byte range of a mapping that one or more `Buf`s read.
struct Region {
    map: Arc<Mapping>,
    offset: usize,
    bytes: usize,
}

impl Drop for Region {
    fn drop(&mut self) {
        // Only pages wholly inside the range: a neighbour may still read
        // the ones at its ends. A page dropped from a private mapping that
        // was never written reads back from the file if touched again, so
        // this changes residency, never contents.
        let page = page_size();
        let base = self.map.as_ptr() as usize;
        let start = (base + self.offset).next_multiple_of(page) - base;
        let end = (base + self.offset + self.bytes) / page * page - base;
        if end > start {
            // Safety: see above; the advice is only about residency here.
            let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }
}

fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // Safety: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(p).ok().filter(|&p| p.is_power_of_two()).unwrap_or(4096)
    })
}

enum Repr<T> {
    Owned(Vec<T>),
    Mapped { region: Arc<Region>, len: usize, elem: PhantomData<T> },
}

/// A tensor's elements, owned or read in place from a mapped file.
pub struct Buf<T> {
    repr: Repr<T>,
}

impl<T> Buf<T> {
    /// Whether the elements are read in place from a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.repr, Repr::Mapped { .. })
    }
}

impl<T: bytemuck::Pod> Buf<T> {
    /// The `len` elements at byte `offset` of `map`, read in place; `None`
    /// where they do not lie inside it or do not start aligned for `T`
    /// (callers then read them into a vector).
    pub fn mapped(map: &Arc<Mapping>, offset: usize, len: usize) -> Option<Buf<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        if offset.checked_add(bytes)? > map.len() || (map.as_ptr() as usize + offset) % std::mem::align_of::<T>() != 0 {
            return None;
        }
        let region = Arc::new(Region { map: map.clone(), offset, bytes });
        Some(Buf { repr: Repr::Mapped { region, len, elem: PhantomData } })
    }
}

impl<T: Clone> Buf<T> {
    /// The elements as a vector: the owned one, or a copy of the mapped ones.
    pub fn into_vec(self) -> Vec<T> {
        match self.repr {
            Repr::Owned(v) => v,
            Repr::Mapped { .. } => self.to_vec(),
        }
    }
}

impl<T> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.repr {
            Repr::Owned(v) => v,
            // Safety: `mapped` checked the range lies in the mapping and
            // starts aligned for `T`, a plain-old-data type; the mapping
            // lives as long as the region, which `self` holds.
            Repr::Mapped { region, len, .. } => unsafe {
                std::slice::from_raw_parts(region.map.as_ptr().add(region.offset) as *const T, *len)
            },
        }
    }
}

impl<T: Clone> DerefMut for Buf<T> {
    /// Writing to mapped elements copies them first.
    fn deref_mut(&mut self) -> &mut [T] {
        if self.is_mapped() {
            self.repr = Repr::Owned(self.to_vec());
        }
        match &mut self.repr {
            Repr::Owned(v) => v,
            Repr::Mapped { .. } => unreachable!("made owned above"),
        }
    }
}

impl<T: Clone> Clone for Buf<T> {
    /// Mapped elements are shared, not copied.
    fn clone(&self) -> Buf<T> {
        Buf {
            repr: match &self.repr {
                Repr::Owned(v) => Repr::Owned(v.clone()),
                Repr::Mapped { region, len, .. } => {
                    Repr::Mapped { region: region.clone(), len: *len, elem: PhantomData }
                }
            },
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: PartialEq> PartialEq for Buf<T> {
    fn eq(&self, other: &Buf<T>) -> bool {
        **self == **other
    }
}

impl<T> Default for Buf<T> {
    fn default() -> Buf<T> {
        Buf { repr: Repr::Owned(Vec::new()) }
    }
}

impl<T> From<Vec<T>> for Buf<T> {
    fn from(v: Vec<T>) -> Buf<T> {
        Buf { repr: Repr::Owned(v) }
    }
}

impl<T: Clone> From<Buf<T>> for Vec<T> {
    fn from(b: Buf<T>) -> Vec<T> {
        b.into_vec()
    }
}

impl<T> FromIterator<T> for Buf<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Buf<T> {
        Buf { repr: Repr::Owned(iter.into_iter().collect()) }
    }
}

impl<'a, T> IntoIterator for &'a Buf<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> std::slice::Iter<'a, T> {
        self.iter()
    }
}

impl<T: Clone> IntoIterator for Buf<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;
    fn into_iter(self) -> std::vec::IntoIter<T> {
        self.into_vec().into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mapped_file(bytes: &[u8]) -> Arc<Mapping> {
        let mut f = tempfile();
        f.write_all(bytes).unwrap();
        map_file(&f).expect("a file on this machine maps")
    }

    fn tempfile() -> std::fs::File {
        let path =
            std::env::temp_dir().join(format!("egret-buf-{}-{:?}", std::process::id(), std::thread::current().id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        // The open file outlives its name.
        let _ = std::fs::remove_file(&path);
        f
    }

    #[test]
    fn mapped_elements_read_in_place_share_on_clone_and_copy_on_write() {
        let xs: Vec<f32> = (0..3000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let mut bytes = vec![0u8; 8];
        bytes.extend(xs.iter().flat_map(|x| x.to_le_bytes()));
        let map = mapped_file(&bytes);
        let b = Buf::<f32>::mapped(&map, 8, xs.len()).unwrap();
        assert!(b.is_mapped());
        assert_eq!(&b[..], &xs[..]);
        let mut c = b.clone();
        assert!(c.is_mapped() && c == b);
        c[1] = 42.0;
        assert!(!c.is_mapped() && b.is_mapped());
        assert_eq!((c[1], b[1]), (42.0, xs[1]));
        assert_eq!(b.clone().into_vec(), xs);
        // Once every holder is gone the pages go back; what remains reads
        // the same (from the file again).
        let d = Buf::<f32>::mapped(&map, 8, xs.len()).unwrap();
        drop(b);
        assert_eq!(&d[..], &xs[..]);
    }

    #[test]
    fn a_range_outside_the_file_or_misaligned_is_not_mapped() {
        let map = mapped_file(&[0u8; 64]);
        assert!(Buf::<f32>::mapped(&map, 0, 16).is_some());
        assert!(Buf::<f32>::mapped(&map, 4, 16).is_none(), "past the end");
        assert!(Buf::<f32>::mapped(&map, 2, 4).is_none(), "misaligned");
        assert!(Buf::<u8>::mapped(&map, 3, 4).is_some());
        assert!(Buf::<f64>::mapped(&map, 0, usize::MAX).is_none(), "overflowing length");
    }
}
