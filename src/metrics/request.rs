//! The request head of `/healthz` and `/metrics`: when it is complete, and its method and
//! path. Pure, and free of the crate's items: the `metrics_request` fuzz target includes this
//! file by path.

/// Largest request head accepted.
pub(crate) const MAX_HEAD: usize = 8 * 1024;

/// Whether `head` holds a whole request head (an empty line ends it), or is already too long
/// to be one.
pub(crate) fn head_complete(head: &[u8]) -> bool {
    head.len() > MAX_HEAD
        || head.windows(4).any(|w| w == b"\r\n\r\n")
        || head.windows(2).any(|w| w == b"\n\n")
}

/// The method and path of a request head, or the status to answer with.
pub(crate) fn parse_request(head: &[u8]) -> Result<(&str, &str), u16> {
    if head.len() > MAX_HEAD {
        return Err(431);
    }
    let line_end = head.iter().position(|&b| b == b'\n').ok_or(400u16)?;
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| 400u16)?;
    let mut words = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return Err(400);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(400);
    }
    if method != "GET" && method != "HEAD" {
        return Err(405);
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok((method, path))
}
