//! A tensor's elements: a vector it owns, a range of a file mapped into
//! memory (a weight read where it lies in the model or its external data),
//! or elements computed when first read (a weight dequantized from codes or
//! widened from half precision, which a backend that keeps the narrow form
//! never reads: `Buf::lazy`).
//!
//! A mapped `Buf` reads like a slice and copies nothing until someone
//! writes to it (`DerefMut` makes it owned first) or asks for a vector.
//! Clones share the mapping, which is unmapped when the last one goes: map
//! each weight's own range (`map_range`), so a weight that a backend packed
//! and dropped leaves the resident set as a freed vector would.
//!
//! The mapping is private and read-only. The file must not shrink while
//! tensors read from it are alive: the importer checks every range against
//! the file's size when it maps it, but a file cut afterwards faults like
//! any mapped file.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// A range of a file mapped read-only, shared by the tensors read from it.
pub type Mapping = memmap2::Mmap;

/// Maps `len` bytes of `file` from `offset`, read-only and private; `None`
/// where that cannot be done (an empty range, a range past the file's
/// end, a file system without mappings): callers read instead.
pub fn map_range(file: &std::fs::File, offset: u64, len: usize) -> Option<Arc<Mapping>> {
    if len == 0 || offset.checked_add(len as u64)? > file.metadata().ok()?.len() {
        return None;
    }
    // Safety: a private, read-only mapping. Egret never writes through it;
    // a file changed on disk while mapped is the documented limit above.
    unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map(file) }.ok().map(Arc::new)
}

enum Repr<T> {
    Owned(Vec<T>),
    Mapped { map: Arc<Mapping>, offset: usize, len: usize, elem: PhantomData<T> },
    Lazy(Arc<Lazy<T>>),
}

/// Elements computed once, by `init`, the first time anything reads them.
struct Lazy<T> {
    len: usize,
    cell: std::sync::OnceLock<Vec<T>>,
    init: Box<dyn Fn() -> Vec<T> + Send + Sync>,
}

/// A tensor's elements, owned or read in place from a mapped file.
pub struct Buf<T> {
    repr: Repr<T>,
}

impl<T> Buf<T> {
    /// `len` elements that `init` computes the first time they are read
    /// (once, shared by every clone). `init` must return `len` elements.
    pub fn lazy(len: usize, init: impl Fn() -> Vec<T> + Send + Sync + 'static) -> Buf<T> {
        Buf { repr: Repr::Lazy(Arc::new(Lazy { len, cell: std::sync::OnceLock::new(), init: Box::new(init) })) }
    }

    /// `v`, shared by clones rather than copied (elements that are only
    /// read, held in two places: a half weight and its widening).
    pub fn shared(v: Vec<T>) -> Buf<T> {
        let len = v.len();
        let cell = std::sync::OnceLock::from(v);
        Buf { repr: Repr::Lazy(Arc::new(Lazy { len, cell, init: Box::new(|| unreachable!("computed already")) })) }
    }

    /// Whether the elements are read in place from a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.repr, Repr::Mapped { .. })
    }

    /// Whether the elements are in memory: false only for lazy elements
    /// nothing has read yet.
    pub fn is_computed(&self) -> bool {
        match &self.repr {
            Repr::Lazy(l) => l.cell.get().is_some(),
            _ => true,
        }
    }

    /// The number of elements, without computing lazy ones.
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Owned(v) => v.len(),
            Repr::Mapped { len, .. } => *len,
            Repr::Lazy(l) => l.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        Some(Buf { repr: Repr::Mapped { map: map.clone(), offset, len, elem: PhantomData } })
    }
}

impl<T: bytemuck::Pod> Buf<T> {
    /// The same bytes as elements of `U`, a type of the same size and
    /// alignment (`i8` as `u8`), without copying; `None` for lazy elements.
    pub fn reinterpret<U: bytemuck::Pod>(self) -> Option<Buf<U>> {
        if std::mem::size_of::<T>() != std::mem::size_of::<U>()
            || std::mem::align_of::<T>() != std::mem::align_of::<U>()
        {
            return None;
        }
        Some(Buf {
            repr: match self.repr {
                Repr::Owned(v) => Repr::Owned(bytemuck::allocation::try_cast_vec(v).ok()?),
                Repr::Mapped { map, offset, len, .. } => Repr::Mapped { map, offset, len, elem: PhantomData },
                Repr::Lazy(_) => return None,
            },
        })
    }
}

impl<T: Clone> Buf<T> {
    /// The elements as a vector: the owned one, or a copy of the mapped ones.
    pub fn into_vec(self) -> Vec<T> {
        match self.repr {
            Repr::Owned(v) => v,
            Repr::Mapped { .. } | Repr::Lazy(_) => self.to_vec(),
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
            // lives as long as `self`, which holds it.
            Repr::Mapped { map, offset, len, .. } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(*offset) as *const T, *len)
            },
            Repr::Lazy(l) => l.cell.get_or_init(|| {
                let v = (l.init)();
                assert_eq!(v.len(), l.len, "a lazy tensor's elements are as many as it said");
                v
            }),
        }
    }
}

impl<T: Clone> DerefMut for Buf<T> {
    /// Writing to mapped or lazy elements copies them first.
    fn deref_mut(&mut self) -> &mut [T] {
        if !matches!(self.repr, Repr::Owned(_)) {
            self.repr = Repr::Owned(self.to_vec());
        }
        match &mut self.repr {
            Repr::Owned(v) => v,
            _ => unreachable!("made owned above"),
        }
    }
}

impl<T: Clone> Clone for Buf<T> {
    /// Mapped and lazy elements are shared, not copied.
    fn clone(&self) -> Buf<T> {
        Buf {
            repr: match &self.repr {
                Repr::Owned(v) => Repr::Owned(v.clone()),
                Repr::Mapped { map, offset, len, .. } => {
                    Repr::Mapped { map: map.clone(), offset: *offset, len: *len, elem: PhantomData }
                }
                Repr::Lazy(l) => Repr::Lazy(l.clone()),
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
        map_range(&f, 0, bytes.len()).expect("a file on this machine maps")
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
    }

    #[test]
    fn a_range_maps_from_any_offset_and_never_past_the_file() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut f = tempfile();
        f.write_all(&bytes).unwrap();
        // Not on a page boundary: the mapping starts at the byte asked for.
        let map = map_range(&f, 4100, 5000).unwrap();
        assert_eq!(&map[..], &bytes[4100..9100]);
        assert!(map_range(&f, 9000, 1001).is_none() && map_range(&f, 0, 0).is_none());
        assert!(map_range(&f, u64::MAX, 1).is_none());
    }

    #[test]
    fn lazy_elements_are_computed_once_when_first_read_and_shared_by_clones() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let b = Buf::lazy(4, move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            vec![1.0f32, 2.0, 3.0, 4.0]
        });
        let c = b.clone();
        assert_eq!((b.len(), b.is_computed()), (4, false), "the length needs no computing");
        assert_eq!(&c[..], &[1.0, 2.0, 3.0, 4.0]);
        assert!(b.is_computed() && c.is_computed());
        assert_eq!(b[2], 3.0);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        let mut d = b.clone();
        d[0] = 9.0;
        assert_eq!((d[0], b[0]), (9.0, 1.0), "written, a copy");
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
