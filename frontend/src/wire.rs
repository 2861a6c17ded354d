//! A model file's weights left where they are while its structure is parsed.
//!
//! `protobuf` decodes every `bytes` field into a `Vec<u8>`, so parsing a
//! model whose weights are inline (`raw_data`) held the file's bytes and a
//! copy of every weight at once: twice the model. This pass walks the
//! protobuf wire format of a `ModelProto` in the file, copies everything
//! except the initializers' `raw_data` fields, and records where each of
//! those lies in the file; the weights are then read from there one at a
//! time, each straight into its decoded tensor (`tensor::data_from_file`).
//!
//! Any file the walk does not understand (a wrong length, a group, a
//! truncated varint) is left to the ordinary parse, which reports it.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;

// Field numbers of the messages on the way to a weight's bytes
// (onnx.proto): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
const MODEL_GRAPH: u64 = 7;
const GRAPH_INITIALIZER: u64 = 5;
const TENSOR_RAW_DATA: u64 = 9;

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

/// A model file's structure with its initializers' `raw_data` set aside.
pub struct SetAside {
    /// The `ModelProto` without those fields, for `protobuf` to parse.
    pub structure: Vec<u8>,
    /// For each initializer, in the order the parsed graph lists them, the
    /// bytes of its `raw_data` in the file (`None` where it had none).
    pub raw: Vec<Option<Range<u64>>>,
}

/// Why the walk gave up (the ordinary parse then reports the file).
#[derive(Debug)]
pub struct NotUnderstood;

impl From<std::io::Error> for NotUnderstood {
    fn from(_: std::io::Error) -> NotUnderstood {
        NotUnderstood
    }
}

/// Walks the `ModelProto` that fills `file` (`len` bytes).
pub fn set_aside_raw_data(file: &File, len: u64) -> Result<SetAside, NotUnderstood> {
    let mut walk = Walk { input: BufReader::with_capacity(1 << 16, file), pos: 0, raw: Vec::new() };
    walk.input.seek(SeekFrom::Start(0))?;
    let structure = walk.message(len, Level::Model)?;
    Ok(SetAside { structure, raw: walk.raw })
}

#[derive(Clone, Copy, PartialEq)]
enum Level {
    Model,
    Graph,
    Tensor,
}

struct Walk<'f> {
    input: BufReader<&'f File>,
    pos: u64,
    raw: Vec<Option<Range<u64>>>,
}

impl Walk<'_> {
    /// Copies the message that ends at `end`, walking into the fields on
    /// the way to a weight's bytes.
    fn message(&mut self, end: u64, level: Level) -> Result<Vec<u8>, NotUnderstood> {
        let mut out = Vec::new();
        let mut raw_data = None;
        while self.pos < end {
            let key = self.varint()?;
            let (field, wire) = (key >> 3, key & 7);
            let child = match (level, field, wire) {
                (Level::Model, MODEL_GRAPH, LEN) => Some(Level::Graph),
                (Level::Graph, GRAPH_INITIALIZER, LEN) => Some(Level::Tensor),
                _ => None,
            };
            if let Some(child) = child {
                let n = self.length(end)?;
                let inner = self.message(self.pos + n, child)?;
                put_varint(&mut out, key);
                put_varint(&mut out, inner.len() as u64);
                out.extend_from_slice(&inner);
                continue;
            }
            if level == Level::Tensor && field == TENSOR_RAW_DATA && wire == LEN {
                // The last occurrence wins, as in a protobuf parse.
                let n = self.length(end)?;
                raw_data = Some(self.pos..self.pos + n);
                self.skip(n)?;
                continue;
            }
            put_varint(&mut out, key);
            match wire {
                VARINT => {
                    let v = self.varint()?;
                    put_varint(&mut out, v);
                }
                FIXED64 => self.copy(8, end, &mut out)?,
                FIXED32 => self.copy(4, end, &mut out)?,
                LEN => {
                    let n = self.length(end)?;
                    put_varint(&mut out, n);
                    self.copy(n, end, &mut out)?;
                }
                // Groups (3, 4) and unknown wire types: not in ONNX files.
                _ => return Err(NotUnderstood),
            }
        }
        if self.pos != end {
            return Err(NotUnderstood);
        }
        if level == Level::Tensor {
            self.raw.push(raw_data.filter(|r| !r.is_empty()));
        }
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, NotUnderstood> {
        let mut b = [0u8];
        self.input.read_exact(&mut b)?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self) -> Result<u64, NotUnderstood> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            // The tenth byte holds bit 63 only; more is a varint `protobuf`
            // refuses ("Incorrect varint"), which the walk must not mend by
            // re-encoding it (found by the import_bytes fuzz target).
            if i == 9 && b > 1 {
                return Err(NotUnderstood);
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(NotUnderstood)
    }

    /// A length prefix, checked to end within the enclosing message.
    fn length(&mut self, end: u64) -> Result<u64, NotUnderstood> {
        let n = self.varint()?;
        match self.pos.checked_add(n) {
            Some(stop) if stop <= end => Ok(n),
            _ => Err(NotUnderstood),
        }
    }

    fn copy(&mut self, n: u64, end: u64, out: &mut Vec<u8>) -> Result<(), NotUnderstood> {
        if self.pos + n > end {
            return Err(NotUnderstood);
        }
        let start = out.len();
        out.resize(start + n as usize, 0);
        self.input.read_exact(&mut out[start..])?;
        self.pos += n;
        Ok(())
    }

    fn skip(&mut self, n: u64) -> Result<(), NotUnderstood> {
        let n = i64::try_from(n).map_err(|_| NotUnderstood)?;
        self.input.seek_relative(n)?;
        self.pos += n as u64;
        Ok(())
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use onnx_protobuf::{GraphProto, ModelProto, NodeProto, TensorProto};
    use protobuf::Message;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> File {
        let mut f = tempfile();
        f.write_all(bytes).unwrap();
        f
    }

    fn tempfile() -> File {
        let path =
            std::env::temp_dir().join(format!("egret-wire-{}-{:?}", std::process::id(), std::thread::current().id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn an_overlong_varint_is_left_to_the_parse() {
        // ir_version (field 1) as a ten-byte varint whose last byte holds
        // more than bit 63: `protobuf` refuses it, so the walk must too.
        let bytes = [0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(ModelProto::parse_from_bytes(&bytes).is_err());
        assert!(set_aside_raw_data(&file_of(&bytes), bytes.len() as u64).is_err());
    }

    #[test]
    fn weights_are_set_aside_and_the_rest_parses_the_same() {
        let mut g = GraphProto::new();
        g.name = "g".into();
        for (i, raw) in [vec![1u8, 2, 3, 4], vec![], vec![9; 300]].into_iter().enumerate() {
            let mut t = TensorProto::new();
            t.name = format!("w{i}");
            t.dims = vec![raw.len() as i64];
            t.data_type = 2;
            t.raw_data = raw;
            g.initializer.push(t);
        }
        let mut n = NodeProto::new();
        n.op_type = "Identity".into();
        n.input = vec!["w0".into()];
        n.output = vec!["y".into()];
        g.node.push(n);
        let mut m = ModelProto::new();
        m.ir_version = 8;
        m.producer_name = "test".into();
        m.graph = Some(g).into();
        let bytes = m.write_to_bytes().unwrap();
        let file = file_of(&bytes);
        let set = set_aside_raw_data(&file, bytes.len() as u64).unwrap();
        assert_eq!(set.raw.len(), 3);
        assert!(set.raw[1].is_none());
        for (i, want) in [Some(&[1u8, 2, 3, 4][..]), None, Some(&[9u8; 300][..])].into_iter().enumerate() {
            if let Some(want) = want {
                let r = set.raw[i].clone().unwrap();
                assert_eq!(&bytes[r.start as usize..r.end as usize], want);
            }
        }
        let parsed = ModelProto::parse_from_bytes(&set.structure).unwrap();
        let mut stripped = m.clone();
        for t in stripped.graph.as_mut().unwrap().initializer.iter_mut() {
            t.raw_data.clear();
        }
        assert_eq!(parsed, stripped);
    }

    #[test]
    fn files_it_does_not_understand_are_left_to_the_parse() {
        for bytes in [&[0x3a, 0x05, 0x2a][..], &[0xff; 12][..], &[0x0b][..]] {
            assert!(set_aside_raw_data(&file_of(bytes), bytes.len() as u64).is_err());
        }
        // An empty file is an empty model.
        assert!(set_aside_raw_data(&file_of(&[]), 0).unwrap().raw.is_empty());
    }
}
