//! Framing of PostgreSQL v3 messages: a tag byte, a 4-byte length, a body.
//!
//! [`MessageStream`] owns a read buffer; [`MessageStream::fill`] is
//! cancel-safe (it only appends to the buffer), so it can sit in `select!`.
//! Every length read from the wire is checked against a maximum before any
//! buffering happens.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// One complete message, zero-copy: `raw` is the whole message as it came
/// off the wire (tag, length, body), ready to forward untouched.
#[derive(Debug, Clone)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    /// The body after the tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    /// Builds a frame from a tag and a body.
    pub fn new(tag: u8, body: &[u8]) -> Frame {
        let mut raw = BytesMut::with_capacity(body.len() + 5);
        raw.extend_from_slice(&[tag]);
        raw.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        raw.extend_from_slice(body);
        Frame {
            tag,
            raw: raw.freeze(),
        }
    }
}

/// Why a message could not be framed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message length {len} is larger than the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("invalid message length {0}")]
    BadLength(i32),
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A buffered reader of framed messages.
pub struct MessageStream<R> {
    inner: R,
    buf: BytesMut,
    max_len: usize,
}

const READ_CHUNK: usize = 16 * 1024;

impl<R: AsyncRead + Unpin> MessageStream<R> {
    /// Wraps a reader; messages longer than `max_len` bytes are refused.
    pub fn new(inner: R, max_len: usize) -> Self {
        MessageStream {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_len,
        }
    }

    /// Changes the maximum message size (the startup phase uses a small one).
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }

    /// Whether a complete message is already buffered.
    pub fn has_frame(&self) -> Result<bool, FrameError> {
        Ok(self.complete_len()?.is_some())
    }

    /// Bytes buffered but not yet taken.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Length of the first complete message in the buffer, if there is one.
    fn complete_len(&self) -> Result<Option<usize>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 {
            return Err(FrameError::BadLength(len));
        }
        let total = len as usize + 1;
        if total > self.max_len {
            return Err(FrameError::TooLarge {
                len: len as usize,
                max: self.max_len,
            });
        }
        Ok((self.buf.len() >= total).then_some(total))
    }

    /// Reads more bytes from the socket. Returns false at end of stream.
    /// Cancel-safe: nothing is lost if the future is dropped.
    pub async fn fill(&mut self) -> Result<bool, FrameError> {
        // A complete message is already buffered: nothing to wait for.
        if let Ok(Some(_)) = self.complete_len() {
            return Ok(true);
        }
        self.buf.reserve(READ_CHUNK);
        let n = self.inner.read_buf(&mut self.buf).await?;
        Ok(n > 0)
    }

    /// Takes the next complete message out of the buffer, without I/O.
    pub fn try_next(&mut self) -> Result<Option<Frame>, FrameError> {
        match self.complete_len()? {
            Some(total) => {
                let raw = self.buf.split_to(total).freeze();
                Ok(Some(Frame { tag: raw[0], raw }))
            }
            None => Ok(None),
        }
    }

    /// The next complete message, borrowed in place (tag, whole message):
    /// relaying it with [`MessageStream::consume`] makes no `Frame`.
    pub fn peek(&self) -> Result<Option<(u8, &[u8])>, FrameError> {
        Ok(self
            .complete_len()?
            .map(|total| (self.buf[0], &self.buf[..total])))
    }

    /// Drops the first `len` buffered bytes (a message [`peek`] showed).
    ///
    /// [`peek`]: MessageStream::peek
    pub fn consume(&mut self, len: usize) {
        self.buf.advance(len);
    }

    /// Reads the next message; `Ok(None)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            if let Some(f) = self.try_next()? {
                return Ok(Some(f));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// Reads an untagged startup-phase packet (length includes itself).
    pub async fn next_startup(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if self.buf.len() >= 4 {
                let len = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                if len < 8 {
                    return Err(FrameError::BadLength(len));
                }
                if len as usize > self.max_len {
                    return Err(FrameError::TooLarge {
                        len: len as usize,
                        max: self.max_len,
                    });
                }
                if self.buf.len() >= len as usize {
                    let mut packet = self.buf.split_to(len as usize);
                    packet.advance(4);
                    return Ok(Some(packet.freeze()));
                }
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// The underlying reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: &[u8], max: usize) -> Result<Vec<Frame>, FrameError> {
        let mut s = MessageStream::new(input, max);
        let mut out = vec![];
        while let Some(f) = s.next().await? {
            out.push(f);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn peeked_messages_are_consumed_in_place() {
        let mut input = Frame::new(b'D', b"row").raw.to_vec();
        input.extend_from_slice(&Frame::new(b'Z', b"I").raw);
        input.extend_from_slice(&[b'C', 0, 0]); // incomplete
        let mut s = MessageStream::new(&input[..], 1024);
        assert!(s.fill().await.unwrap());
        let (tag, raw) = s.peek().unwrap().expect("complete");
        assert_eq!((tag, raw), (b'D', &Frame::new(b'D', b"row").raw[..]));
        let len = raw.len();
        s.consume(len);
        let f = s.try_next().unwrap().expect("the next one");
        assert_eq!((f.tag, f.body()), (b'Z', &b"I"[..]));
        assert!(s.peek().unwrap().is_none(), "the rest is incomplete");
    }

    #[tokio::test]
    async fn splits_messages_and_keeps_raw_bytes() {
        let mut input = Frame::new(b'Q', b"select 1\0").raw.to_vec();
        input.extend_from_slice(&Frame::new(b'S', b"").raw);
        let f = frames(&input, 1024).await.unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].tag, b'Q');
        assert_eq!(f[0].body(), b"select 1\0");
        assert_eq!(&f[1].raw[..], &[b'S', 0, 0, 0, 4]);
    }

    #[tokio::test]
    async fn refuses_oversized_and_bad_lengths() {
        let big = Frame::new(b'Q', &vec![b'x'; 2000]);
        assert!(matches!(
            frames(&big.raw, 1024).await,
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            frames(&[b'Q', 0, 0, 0, 2], 1024).await,
            Err(FrameError::BadLength(2))
        ));
        assert!(matches!(
            frames(&[b'Q', 0x7f, 0xff, 0xff, 0xff], 1024).await,
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn truncated_input_is_an_error() {
        let f = Frame::new(b'Q', b"select 1\0");
        assert!(matches!(
            frames(&f.raw[..7], 1024).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn startup_packets() {
        let mut s = MessageStream::new(&[0u8, 0, 0, 8, 4, 210, 22, 47][..], 10_000);
        let p = s.next_startup().await.unwrap().unwrap();
        assert_eq!(&p[..], &[4, 210, 22, 47]);
        let mut s = MessageStream::new(&[0u8, 0, 0, 3][..], 10_000);
        assert!(s.next_startup().await.is_err());
        let mut s = MessageStream::new(&[0x7fu8, 0, 0, 3][..], 10_000);
        assert!(matches!(
            s.next_startup().await,
            Err(FrameError::TooLarge { .. })
        ));
    }
}
