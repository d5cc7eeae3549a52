//! A minimal protobuf writer for the wire-identity tests: messages are encoded by hand from
//! upstream field numbers and decoded with the generated types.
#![allow(dead_code)]

/// A minimal protobuf writer: tag = field << 3 | wire type.
#[derive(Default)]
pub struct W(pub Vec<u8>);

impl W {
    pub fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
    pub fn uint(mut self, field: u32, v: u64) -> Self {
        self.varint(u64::from(field) << 3);
        self.varint(v);
        self
    }
    pub fn bytes(mut self, field: u32, b: &[u8]) -> Self {
        self.varint((u64::from(field) << 3) | 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(self, field: u32, s: &str) -> Self {
        self.bytes(field, s.as_bytes())
    }
    pub fn msg(self, field: u32, m: W) -> Self {
        self.bytes(field, &m.0)
    }
    pub fn double(mut self, field: u32, v: f64) -> Self {
        self.varint((u64::from(field) << 3) | 1);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// An empty message.
pub fn w() -> W {
    W::default()
}
