//! Length-delimited frames: a 4-byte big-endian length, then that many bytes of a prost
//! message. Used by both the peer RPC and the client protocol.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    #[error("{0}")]
    TimedOut(&'static str),
}

/// Why a frame's body was cut off.
const SLOW_BODY: &str = "a frame's body arrived too slowly";

/// A connection's read buffer is shrunk back after a frame larger than this, so that one
/// large request does not stay allocated for the connection's life.
const KEEP_BUFFER: usize = 64 * 1024;

/// How long a connection may wait for its next frame, and how long a frame's body may
/// take once its length has arrived.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub idle: Duration,
    pub body: Duration,
}

/// Read one frame within `t`: a peer that says nothing, or announces a frame and then
/// trickles it, is cut off instead of holding its connection (and buffer) for ever.
pub async fn read_frame_within<M, R>(r: &mut R, max: usize, buf: &mut Vec<u8>, t: Timeouts) -> Result<M, FrameError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    let len = read_len_within(r, t.idle).await?;
    read_body_within(r, len, max, buf, t.body).await
}

/// The next frame's length, if it starts within `idle`.
pub async fn read_len_within<R: AsyncRead + Unpin>(r: &mut R, idle: Duration) -> Result<usize, FrameError> {
    within(idle, "idle for too long", read_len(r)).await
}

/// A frame's body of `len` bytes, if it arrives within `body`.
pub async fn read_body_within<M, R>(
    r: &mut R,
    len: usize,
    max: usize,
    buf: &mut Vec<u8>,
    body: Duration,
) -> Result<M, FrameError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    within(body, SLOW_BODY, read_body(r, len, max, buf)).await
}

/// `read_body_within`, with the body's bytes counted against `budget` (in KiB, at least
/// one) as they arrive rather than up front: a sender that announces a large frame and
/// sends nothing holds almost none of it. The permit comes back with the message, to be
/// held for as long as the request is.
pub async fn read_body_budgeted<M, R>(
    r: &mut R,
    len: usize,
    max: usize,
    buf: &mut Vec<u8>,
    within: Duration,
    budget: &Arc<Semaphore>,
) -> Result<(M, OwnedSemaphorePermit), FrameError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    const CHUNK: usize = 64 * 1024;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let gone = |_| FrameError::Io(std::io::Error::other("the member is stopping"));
    let read = async {
        buf.clear();
        let units = |chunk: usize| chunk.div_ceil(1024) as u32;
        let mut chunk = len.min(CHUNK);
        // One unit for the request itself (an empty body holds one too), taken with the
        // first chunk's: a small request acquires once.
        let mut held = budget.clone().acquire_many_owned(1 + units(chunk)).await.map_err(gone)?;
        while chunk > 0 {
            if (&mut *r).take(chunk as u64).read_to_end(buf).await? < chunk {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            chunk = (len - buf.len()).min(CHUNK);
            if chunk > 0 {
                held.merge(budget.clone().acquire_many_owned(units(chunk)).await.map_err(gone)?);
            }
        }
        Ok((decode_and_shrink(buf)?, held))
    };
    self::within(within, SLOW_BODY, read).await
}

/// Reads past a frame too large to accept, keeping the stream in step, and returns the
/// value of its field 1 if the frame starts with it (the request id in `ClientRequest`,
/// which prost writes first), so that the refusal can name the request it answers.
pub async fn skip_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
    within: Duration,
) -> Result<Option<u64>, FrameError> {
    let skip = async {
        let mut head = [0u8; 11];
        let n = head.len().min(len);
        r.read_exact(&mut head[..n]).await?;
        tokio::io::copy(&mut (&mut *r).take((len - n) as u64), &mut tokio::io::sink()).await?;
        Ok::<_, FrameError>(leading_field_1(&head[..n]))
    };
    self::within(within, SLOW_BODY, skip).await
}

/// Field 1 as a varint at the start of an encoded message.
fn leading_field_1(bytes: &[u8]) -> Option<u64> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != 0x08 {
        return None;
    }
    let mut value = 0u64;
    for (i, b) in rest.iter().take(10).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Read one frame. `Closed` only when the peer closed cleanly between frames.
pub async fn read_frame<M, R>(r: &mut R, max: usize, buf: &mut Vec<u8>) -> Result<M, FrameError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    let len = read_len(r).await?;
    read_body(r, len, max, buf).await
}

async fn read_len<R: AsyncRead + Unpin>(r: &mut R) -> Result<usize, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => Ok(u32::from_be_bytes(len) as usize),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Closed),
        Err(e) => Err(e.into()),
    }
}

async fn read_body<M, R>(r: &mut R, len: usize, max: usize, buf: &mut Vec<u8>) -> Result<M, FrameError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    buf.clear();
    // The buffer grows as the body arrives, never to the announced length up front: a
    // stranger can announce 16 MiB and send nothing, on as many connections as it likes.
    let got = (&mut *r).take(len as u64).read_to_end(buf).await?;
    if got < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    decode_and_shrink(buf)
}

/// Decodes the frame in `buf`, then lets go of the buffer if a large frame grew it.
fn decode_and_shrink<M: Message + Default>(buf: &mut Vec<u8>) -> Result<M, FrameError> {
    let msg = M::decode(buf.as_slice());
    if buf.capacity() > KEEP_BUFFER {
        *buf = Vec::new();
    }
    Ok(msg?)
}

/// `read`'s result if it completes within `limit`, else `TimedOut(why)`.
async fn within<T>(
    limit: Duration,
    why: &'static str,
    read: impl std::future::Future<Output = Result<T, FrameError>>,
) -> Result<T, FrameError> {
    tokio::time::timeout(limit, read).await.unwrap_or(Err(FrameError::TimedOut(why)))
}

/// Append one encoded frame to `out` (so that several frames go out in one write).
///
/// Panics on a message of 4 GiB or more, which no sender may produce: every frame is
/// bounded far below that (commands, AppendEntries batches, snapshot chunks).
pub fn encode_frame<M: Message>(msg: &M, out: &mut Vec<u8>) {
    let len = msg.encoded_len();
    assert!(u32::try_from(len).is_ok(), "a frame of {len} bytes cannot be sent: its length would wrap");
    out.reserve(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    // Encoding into a Vec cannot fail: it grows as needed.
    let _ = msg.encode(out);
}

/// One write's worth of ready frames: `encode`s `first`, then whatever `ready` yields at
/// once, until `out` holds `max` bytes or more. A writer task calls it with its queue's
/// `try_recv`, so frames that queue up while a write is in progress leave in one write.
pub fn gather<T>(
    first: T,
    mut ready: impl FnMut() -> Option<T>,
    max: usize,
    out: &mut Vec<u8>,
    mut encode: impl FnMut(T, &mut Vec<u8>),
) {
    let mut next = Some(first);
    while let Some(item) = next.take() {
        encode(item, out);
        if out.len() < max {
            next = ready();
        }
    }
}

pub async fn write_frame<M, W>(w: &mut W, msg: &M) -> Result<(), FrameError>
where
    M: Message,
    W: AsyncWrite + Unpin,
{
    let len = msg.encoded_len();
    if u32::try_from(len).is_err() {
        return Err(FrameError::TooLarge { len, max: u32::MAX as usize });
    }
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

    /// A frame too large to take is skipped whole, so the next one is read in step, and
    /// its request id is recovered for the refusal.
    #[tokio::test]
    async fn an_oversized_frame_is_skipped_and_names_its_request() {
        let big = ClientRequest { id: 300, kind: 0, payload: vec![7; 5000], stale_ok: false };
        let next = ClientRequest { id: 301, kind: 1, payload: b"get-1".to_vec(), stale_ok: false };
        let mut wire = Vec::new();
        encode_frame(&big, &mut wire);
        encode_frame(&next, &mut wire);
        let mut r = wire.as_slice();
        let len = read_len(&mut r).await.expect("length");
        assert!(len > 1024);
        assert_eq!(skip_frame(&mut r, len, Duration::from_secs(1)).await.expect("skip"), Some(300));
        let mut buf = Vec::new();
        let got: ClientRequest = read_frame(&mut r, 1024, &mut buf).await.expect("the next frame");
        assert_eq!(got, next);
        assert_eq!(leading_field_1(&[0x12, 0x01]), None, "a frame that does not start with field 1");
    }

    /// The budget is taken as the body arrives: a sender that announced a large frame
    /// and sent little holds little of it, and the permit covers what was read.
    #[tokio::test]
    async fn request_bytes_are_taken_from_the_budget_as_they_arrive() {
        let budget = Arc::new(Semaphore::new(1000));
        let req = ClientRequest { id: 1, kind: 0, payload: vec![1; 200 * 1024], stale_ok: false };
        let mut wire = Vec::new();
        encode_frame(&req, &mut wire);
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        client.write_all(&wire[..4 + 10]).await.expect("a little of it");
        let len = read_len(&mut server).await.expect("length");
        let mut buf = Vec::new();
        let slow = read_body_budgeted::<ClientRequest, _>(
            &mut server,
            len,
            1 << 20,
            &mut buf,
            Duration::from_millis(200),
            &budget,
        )
        .await;
        assert!(matches!(slow, Err(FrameError::TimedOut(_))), "{slow:?}");
        assert_eq!(budget.available_permits(), 1000, "given back when the read gave up");

        let mut r = wire.as_slice();
        let len = read_len(&mut r).await.expect("length");
        let (got, held) =
            read_body_budgeted::<ClientRequest, _>(&mut r, len, 1 << 20, &mut buf, Duration::from_secs(1), &budget)
                .await
                .expect("frame");
        assert_eq!(got, req);
        assert!(held.num_permits() > 200, "the permit covers the body: {}", held.num_permits());
        assert!(buf.capacity() <= KEEP_BUFFER, "a large buffer is not kept");
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
