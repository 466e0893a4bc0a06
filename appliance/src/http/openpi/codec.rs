//! MessagePack as openpi's client speaks it (`openpi_client.msgpack_numpy`): maps, strings,
//! numbers, and NumPy arrays as `{"__ndarray__": true, "data": <bin>, "dtype": "<f4", "shape":
//! [..]}` (the marker keys packed as bytes), scalars as `{"__npgeneric__": true, …}`.
//!
//! The decoder reads a message the client sent, bounded before it allocates: every declared
//! length is checked against the bytes left, nesting is at most [`MAX_DEPTH`] deep, and binary
//! data is a slice of the message, not a copy. Extension types are refused.

use bytes::Bytes;

/// Deeper nesting than any observation needs; bounds the decoder's recursion.
pub const MAX_DEPTH: usize = 16;

/// A decoded MessagePack value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bin(Bytes),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
}

impl Value {
    /// The text of a string, or of a bytes key (NumPy's marker keys are bytes).
    pub fn as_key(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            Value::Bin(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The entry `key` of a map (string or bytes key).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.as_key() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Int(i) => Some(i as f64),
            Value::Float(f) => Some(f),
            Value::Bool(b) => Some(f64::from(u8::from(b))),
            _ => None,
        }
    }
}

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a MessagePack message openpi's client would send: {0}")]
pub struct DecodeError(pub String);

fn bad(what: impl Into<String>) -> DecodeError {
    DecodeError(what.into())
}

/// Reads one value filling the whole of `message`.
pub fn decode(message: &Bytes) -> Result<Value, DecodeError> {
    let mut r = Reader { buf: message, at: 0 };
    let v = r.value(0)?;
    if r.at != message.len() {
        return Err(bad(format!("{} bytes after the message", message.len() - r.at)));
    }
    Ok(v)
}

struct Reader<'a> {
    buf: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.buf.len() - self.at < n {
            return Err(bad("the message ends inside a value"));
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn uint(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    /// A declared element count, which cannot exceed the bytes left (each element takes one).
    fn count(&mut self, n: usize) -> Result<usize, DecodeError> {
        let len = self.uint(n)? as usize;
        if len > self.buf.len() - self.at {
            return Err(bad(format!("a length of {len} with {} bytes left", self.buf.len() - self.at)));
        }
        Ok(len)
    }

    fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() - self.at < len {
            return Err(bad("the message ends inside a value"));
        }
        let b = self.buf.slice(self.at..self.at + len);
        self.at += len;
        Ok(b)
    }

    fn text(&mut self, len: usize) -> Result<Value, DecodeError> {
        let b = self.bytes(len)?;
        String::from_utf8(b.to_vec()).map(Value::Str).map_err(|_| bad("a string that is not UTF-8"))
    }

    fn array(&mut self, len: usize, depth: usize) -> Result<Value, DecodeError> {
        let mut items = Vec::with_capacity(len);
        for _ in 0..len {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, len: usize, depth: usize) -> Result<Value, DecodeError> {
        let mut entries = Vec::with_capacity(len);
        for _ in 0..len {
            let k = self.value(depth + 1)?;
            let v = self.value(depth + 1)?;
            entries.push((k, v));
        }
        Ok(Value::Map(entries))
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(bad(format!("nested more than {MAX_DEPTH} deep")));
        }
        let marker = self.take(1)?[0];
        Ok(match marker {
            0x00..=0x7f => Value::Int(i64::from(marker)),
            0xe0..=0xff => Value::Int(i64::from(marker as i8)),
            0x80..=0x8f => return self.map(usize::from(marker & 0x0f), depth),
            0x90..=0x9f => return self.array(usize::from(marker & 0x0f), depth),
            0xa0..=0xbf => return self.text(usize::from(marker & 0x1f)),
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => {
                let len = self.count(1 << (marker - 0xc4))?;
                Value::Bin(self.bytes(len)?)
            }
            0xca => Value::Float(f64::from(f32::from_bits(self.uint(4)? as u32))),
            0xcb => Value::Float(f64::from_bits(self.uint(8)?)),
            0xcc..=0xcf => {
                let v = self.uint(1 << (marker - 0xcc))?;
                Value::Int(i64::try_from(v).map_err(|_| bad("an integer beyond the int64 range"))?)
            }
            0xd0..=0xd3 => {
                let n = 1usize << (marker - 0xd0);
                let v = self.uint(n)?;
                // Sign-extend from n bytes.
                let shift = 64 - 8 * n as u32;
                Value::Int(((v << shift) as i64) >> shift)
            }
            0xd9..=0xdb => {
                let len = self.count(1 << (marker - 0xd9))?;
                return self.text(len);
            }
            0xdc | 0xdd => {
                let len = self.count(2 << (marker - 0xdc))?;
                return self.array(len, depth);
            }
            0xde | 0xdf => {
                let len = self.count(2 << (marker - 0xde))?;
                return self.map(len, depth);
            }
            _ => return Err(bad(format!("MessagePack type 0x{marker:02x} (extension types are not read)"))),
        })
    }
}

/// A NumPy array as the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct NdArray {
    /// NumPy's type string, e.g. `|u1`, `<f4`.
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

/// What one entry of an observation holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Array(NdArray),
    Value(Value),
}

/// `value` as an array when it is one (`__ndarray__`), with its data the size its dtype and
/// shape say; `Ok(None)` when it is something else.
pub fn ndarray(value: &Value) -> Result<Option<NdArray>, String> {
    if !matches!(value.get("__ndarray__"), Some(Value::Bool(true))) {
        return Ok(None);
    }
    let dtype = match value.get("dtype").and_then(Value::as_key) {
        Some(d) => d.to_string(),
        None => return Err("an ndarray without a `dtype` string".into()),
    };
    let shape = match value.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(|d| match d {
                Value::Int(n) if *n >= 0 => Ok(*n as usize),
                _ => Err("an ndarray `shape` of non-negative integers".to_string()),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err("an ndarray without a `shape` list".into()),
    };
    let data = match value.get("data") {
        Some(Value::Bin(b)) => b.clone(),
        _ => return Err("an ndarray without binary `data`".into()),
    };
    let size = element_size(&dtype).ok_or_else(|| format!("ndarray dtype `{}` is not read", clip(&dtype)))?;
    let count = shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d)).ok_or("an ndarray shape that overflows")?;
    if count.checked_mul(size) != Some(data.len()) {
        return Err(format!(
            "an ndarray of shape {shape:?} and dtype `{dtype}` needs {} bytes, its data has {}",
            count.saturating_mul(size),
            data.len()
        ));
    }
    Ok(Some(NdArray { dtype, shape, data }))
}

fn clip(s: &str) -> String {
    s.chars().take(16).collect()
}

/// Bytes per element of the NumPy dtypes read here (little-endian or single-byte ones).
fn element_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "|u1" | "|i1" | "|b1" => 1,
        "<u2" | "<i2" | "<f2" => 2,
        "<u4" | "<i4" | "<f4" => 4,
        "<u8" | "<i8" | "<f8" => 8,
        _ => return None,
    })
}

impl NdArray {
    /// Every element as `f64` (numeric dtypes).
    pub fn to_f64(&self) -> Vec<f64> {
        let d = &self.data[..];
        match self.dtype.as_str() {
            "|u1" | "|b1" => d.iter().map(|&b| f64::from(b)).collect(),
            "|i1" => d.iter().map(|&b| f64::from(b as i8)).collect(),
            "<u2" => d.chunks_exact(2).map(|c| f64::from(u16::from_le_bytes([c[0], c[1]]))).collect(),
            "<i2" => d.chunks_exact(2).map(|c| f64::from(i16::from_le_bytes([c[0], c[1]]))).collect(),
            "<f2" => d.chunks_exact(2).map(|c| f64::from(half_to_f32(u16::from_le_bytes([c[0], c[1]])))).collect(),
            "<u4" => d.chunks_exact(4).map(|c| f64::from(u32::from_le_bytes(c.try_into().unwrap_or([0; 4])))).collect(),
            "<i4" => d.chunks_exact(4).map(|c| f64::from(i32::from_le_bytes(c.try_into().unwrap_or([0; 4])))).collect(),
            "<f4" => d.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))).collect(),
            "<u8" => d.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64).collect(),
            "<i8" => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64).collect(),
            "<f8" => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(),
            _ => Vec::new(),
        }
    }
}

/// IEEE half to single precision.
fn half_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// An observation's entries by key, nested maps walked into `outer/inner` keys (arrays and
/// scalars are leaves). The top level must be a map with string keys.
pub fn flatten(message: Value) -> Result<Vec<(String, Item)>, String> {
    let Value::Map(entries) = message else {
        return Err("an observation must be a map of keys to values".into());
    };
    let mut out = Vec::new();
    type Pending = (String, Vec<(Value, Value)>, usize);
    let mut stack: Vec<Pending> = vec![(String::new(), entries, 0)];
    while let Some((prefix, entries, depth)) = stack.pop() {
        for (k, v) in entries {
            let Some(key) = k.as_key() else {
                return Err(format!("a key under `{prefix}` that is not a string"));
            };
            let key = if prefix.is_empty() { key.to_string() } else { format!("{prefix}/{key}") };
            match ndarray(&v).map_err(|e| format!("`{key}`: {e}"))? {
                Some(array) => out.push((key, Item::Array(array))),
                None if v.get("__npgeneric__").is_some() => {
                    out.push((key, Item::Value(v.get("data").cloned().unwrap_or(Value::Nil))))
                }
                None => match v {
                    Value::Map(inner) if depth < MAX_DEPTH => stack.push((key, inner, depth + 1)),
                    other => out.push((key, Item::Value(other))),
                },
            }
        }
    }
    Ok(out)
}

/// Numbers from an array, a list of numbers or one number.
pub fn numbers(item: &Item) -> Option<Vec<f64>> {
    match item {
        Item::Array(a) if a.dtype != "|b1" || !a.data.is_empty() => Some(a.to_f64()),
        Item::Array(_) => Some(Vec::new()),
        Item::Value(Value::Array(items)) => items.iter().map(Value::as_f64).collect(),
        Item::Value(v) => v.as_f64().map(|x| vec![x]),
    }
}

/// Writes MessagePack values for answers.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    fn len_marker(&mut self, len: usize, fix: u8, fix_max: usize, m16: u8) {
        if len <= fix_max {
            self.buf.push(fix | len as u8);
        } else if len <= 0xffff {
            self.buf.push(m16);
            self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.buf.push(m16 + 1);
            self.buf.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }

    pub fn map(&mut self, len: usize) -> &mut Self {
        self.len_marker(len, 0x80, 15, 0xde);
        self
    }

    pub fn array(&mut self, len: usize) -> &mut Self {
        self.len_marker(len, 0x90, 15, 0xdc);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        let len = s.len();
        if len <= 31 {
            self.buf.push(0xa0 | len as u8);
        } else if len <= 0xff {
            self.buf.extend_from_slice(&[0xd9, len as u8]);
        } else if len <= 0xffff {
            self.buf.push(0xda);
            self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.buf.push(0xdb);
            self.buf.extend_from_slice(&(len as u32).to_be_bytes());
        }
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    pub fn bin(&mut self, b: &[u8]) -> &mut Self {
        let len = b.len();
        if len <= 0xff {
            self.buf.extend_from_slice(&[0xc4, len as u8]);
        } else if len <= 0xffff {
            self.buf.push(0xc5);
            self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.buf.push(0xc6);
            self.buf.extend_from_slice(&(len as u32).to_be_bytes());
        }
        self.buf.extend_from_slice(b);
        self
    }

    pub fn int(&mut self, v: i64) -> &mut Self {
        self.buf.push(0xd3);
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn float(&mut self, v: f64) -> &mut Self {
        self.buf.push(0xcb);
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.buf.push(if v { 0xc3 } else { 0xc2 });
        self
    }

    pub fn nil(&mut self) -> &mut Self {
        self.buf.push(0xc0);
        self
    }

    /// A NumPy array as `msgpack_numpy` unpacks it (marker keys as bytes): `data` holds the
    /// elements of `dtype` (a NumPy type string), little-endian.
    pub fn ndarray(&mut self, dtype: &str, shape: &[usize], data: &[u8]) -> &mut Self {
        self.map(4);
        self.bin(b"__ndarray__").bool(true);
        self.bin(b"data").bin(data);
        self.bin(b"dtype").str(dtype);
        self.bin(b"shape").array(shape.len());
        for &d in shape {
            self.int(d as i64);
        }
        self
    }

    /// A float32 NumPy array.
    pub fn f32_array(&mut self, shape: &[usize], values: &[f32]) -> &mut Self {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.ndarray("<f4", shape, &data)
    }

    /// A JSON value (a decision chain, say) as MessagePack.
    pub fn json(&mut self, v: &serde_json::Value) -> &mut Self {
        match v {
            serde_json::Value::Null => self.nil(),
            serde_json::Value::Bool(b) => self.bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => self.int(i),
                None => self.float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => self.str(s),
            serde_json::Value::Array(items) => {
                self.array(items.len());
                for i in items {
                    self.json(i);
                }
                self
            }
            serde_json::Value::Object(m) => {
                self.map(m.len());
                for (k, v) in m {
                    self.str(k).json(v);
                }
                self
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn round(w: &Writer) -> Value {
        decode(&Bytes::from(w.buf.clone())).unwrap()
    }

    #[test]
    fn what_the_writer_writes_the_reader_reads() {
        let mut w = Writer::default();
        w.map(3).str("a").int(-5).str("b").float(1.5).str("c").array(2).str(&"x".repeat(300)).bin(&[1, 2, 3]);
        let v = round(&w);
        assert_eq!(v.get("a"), Some(&Value::Int(-5)));
        assert_eq!(v.get("b"), Some(&Value::Float(1.5)));
        assert_eq!(
            v.get("c"),
            Some(&Value::Array(vec![Value::Str("x".repeat(300)), Value::Bin(Bytes::from_static(&[1, 2, 3]))]))
        );
    }

    #[test]
    fn an_f32_array_reads_back_as_an_ndarray() {
        let mut w = Writer::default();
        w.f32_array(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let a = ndarray(&round(&w)).unwrap().unwrap();
        assert_eq!((a.dtype.as_str(), a.shape.as_slice()), ("<f4", &[2usize, 3][..]));
        assert_eq!(a.to_f64(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn lengths_beyond_the_message_are_refused_before_allocating() {
        // array32 declaring 4 billion elements, map32 likewise, bin32 of 4 GB, str32.
        for m in [0xdd, 0xdf, 0xc6, 0xdb] {
            let e = decode(&Bytes::from(vec![m, 0xff, 0xff, 0xff, 0xff, 0])).unwrap_err();
            assert!(e.0.contains("length") || e.0.contains("ends"), "{e}");
        }
        // Deep nesting.
        let e = decode(&Bytes::from(vec![0x91; 100])).unwrap_err();
        assert!(e.0.contains("nested"), "{e}");
        // Extension types, trailing bytes.
        assert!(decode(&Bytes::from_static(&[0xd4, 1, 2])).is_err());
        assert!(decode(&Bytes::from_static(&[0x01, 0x02])).is_err());
    }

    #[test]
    fn signed_and_unsigned_integers_of_every_width() {
        for (bytes, want) in [
            (vec![0xd0, 0xff], -1),
            (vec![0xd1, 0xff, 0xfe], -2),
            (vec![0xd2, 0x80, 0, 0, 0], i64::from(i32::MIN)),
            (vec![0xcd, 0x01, 0x00], 256),
            (vec![0xef], -17),
        ] {
            assert_eq!(decode(&Bytes::from(bytes)).unwrap(), Value::Int(want));
        }
        assert!(decode(&Bytes::from_static(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])).is_err());
    }

    #[test]
    fn an_ndarray_whose_data_is_not_its_shape_is_refused() {
        let mut w = Writer::default();
        w.map(4);
        w.bin(b"__ndarray__").bool(true);
        w.bin(b"data").bin(&[0; 10]);
        w.bin(b"dtype").str("|u1");
        w.bin(b"shape").array(2).int(3).int(4);
        let e = ndarray(&round(&w)).unwrap_err();
        assert!(e.contains("needs 12 bytes"), "{e}");
    }

    #[test]
    fn nested_maps_flatten_into_slash_keys() {
        let mut w = Writer::default();
        w.map(2).str("observation").map(1).str("state").array(2).float(0.5).int(1);
        w.str("prompt").str("pick");
        let flat = flatten(round(&w)).unwrap();
        let get = |k: &str| flat.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(numbers(&get("observation/state").unwrap()), Some(vec![0.5, 1.0]));
        assert_eq!(get("prompt"), Some(Item::Value(Value::Str("pick".into()))));
    }

    #[test]
    fn half_floats() {
        assert_eq!(half_to_f32(0x3c00), 1.0);
        assert_eq!(half_to_f32(0xc000), -2.0);
        assert_eq!(half_to_f32(0x0001), 2f32.powi(-24));
    }
}
