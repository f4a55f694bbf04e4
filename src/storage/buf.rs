//! Array storage that is either owned or served from a memory-mapped file.

use std::ops::Deref;
use std::sync::Arc;

use bytemuck::Pod;

/// A slice of `T`: owned (while training) or read from a mapped ledger file, so a
/// loaded ledger's factors and dense accounts need not be copied into memory.
#[derive(Clone, Debug)]
pub(crate) enum Buf<T> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<super::MappedFile>,
        start: usize,
        len: usize,
    },
}

impl<T> Default for Buf<T> {
    fn default() -> Self {
        Buf::Owned(Vec::new())
    }
}

impl<T: Pod> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { map, start, len } => {
                bytemuck::cast_slice(&map[*start..*start + len * std::mem::size_of::<T>()])
            }
        }
    }
}

impl<T: Pod> Buf<T> {
    /// The values, owned (a mapped buffer is copied on first mutation).
    pub(crate) fn to_mut(&mut self) -> &mut Vec<T> {
        if let Buf::Mapped { .. } = self {
            *self = Buf::Owned(self.to_vec());
        }
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { .. } => unreachable!("invariant: converted above"),
        }
    }

    /// A view of `bytes` (a sub-slice of `map`) as `T`s when it is aligned and the
    /// machine is little-endian (the file's byte order); `None` otherwise.
    pub(crate) fn mapped(map: &Arc<super::MappedFile>, bytes: &[u8]) -> Option<Self> {
        let size = std::mem::size_of::<T>();
        let start = (bytes.as_ptr() as usize).checked_sub(map.as_ptr() as usize)?;
        let aligned = (bytes.as_ptr() as usize) % std::mem::align_of::<T>() == 0;
        (cfg!(target_endian = "little")
            && aligned
            && bytes.len() % size == 0
            && start + bytes.len() <= map.len())
        .then(|| Buf::Mapped {
            map: Arc::clone(map),
            start,
            len: bytes.len() / size,
        })
    }

    /// Bytes served from a mapped file.
    pub(crate) fn mapped_bytes(&self) -> usize {
        match self {
            Buf::Owned(_) => 0,
            Buf::Mapped { len, .. } => len * std::mem::size_of::<T>(),
        }
    }
}
