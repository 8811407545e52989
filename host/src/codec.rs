//! Length-delimited frames: a 4-byte big-endian length, then that many bytes of a prost
//! message. Used by both the peer RPC and the client protocol.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Default upper bound of one frame. Snapshot chunks (1 MiB) and batches of
/// AppendEntries stay well below it; anything larger is a malformed or hostile peer.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Read one frame. `Closed` only when the peer closed cleanly between frames.
pub async fn read_frame<M, R>(r: &mut R, max: usize, buf: &mut Vec<u8>) -> Result<M, FrameError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(M::decode(buf.as_slice())?)
}

/// Append one encoded frame to `out` (so that several frames go out in one write).
pub fn encode_frame<M: Message>(msg: &M, out: &mut Vec<u8>) {
    let len = msg.encoded_len();
    out.reserve(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    // Encoding into a Vec cannot fail: it grows as needed.
    let _ = msg.encode(out);
}

pub async fn write_frame<M, W>(w: &mut W, msg: &M) -> Result<(), FrameError>
where
    M: Message,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::new();
    encode_frame(msg, &mut out);
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ClientRequest;

    #[tokio::test]
    async fn roundtrip_and_limits() {
        let req = ClientRequest { id: 7, kind: 1, payload: b"get-1".to_vec(), stale_ok: false };
        let mut wire = Vec::new();
        encode_frame(&req, &mut wire);
        encode_frame(&req, &mut wire);
        let mut r = wire.as_slice();
        let mut buf = Vec::new();
        for _ in 0..2 {
            let got: ClientRequest = read_frame(&mut r, 1024, &mut buf).await.expect("frame");
            assert_eq!(got, req);
        }
        assert!(matches!(read_frame::<ClientRequest, _>(&mut r, 1024, &mut buf).await, Err(FrameError::Closed)));

        let mut r = wire.as_slice();
        assert!(matches!(
            read_frame::<ClientRequest, _>(&mut r, 3, &mut buf).await,
            Err(FrameError::TooLarge { max: 3, .. })
        ));

        // A truncated frame is an I/O error, not a clean close.
        let mut r = &wire[..wire.len() / 2 - 1];
        assert!(matches!(read_frame::<ClientRequest, _>(&mut r, 1024, &mut buf).await, Err(FrameError::Io(_))));

        // Garbage that is not a valid message is a decode error.
        let garbage = [0u8, 0, 0, 3, 0xff, 0xff, 0xff];
        let mut r = &garbage[..];
        assert!(matches!(read_frame::<ClientRequest, _>(&mut r, 1024, &mut buf).await, Err(FrameError::Decode(_))));
    }

    /// Random bytes must give an error or a message, never a panic or a huge allocation.
    #[tokio::test]
    async fn random_bytes_never_panic() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = Vec::new();
        for _ in 0..20_000 {
            // Mostly plausible length prefixes, so that the decoder sees random bodies;
            // sometimes a wild one.
            let mut data = Vec::new();
            for _ in 0..(next() % 4) {
                let declared = if next() % 8 == 0 { next() as u32 } else { (next() % 48) as u32 };
                data.extend_from_slice(&declared.to_be_bytes());
                let len = (next() % 48) as usize;
                data.extend((0..len).map(|_| next() as u8));
            }
            let mut r = data.as_slice();
            while let Ok(_req) = read_frame::<ClientRequest, _>(&mut r, 256, &mut buf).await {}
            assert!(buf.capacity() <= 1024, "a length prefix made us allocate {}", buf.capacity());
        }
    }
}
