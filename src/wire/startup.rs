//! The startup packet: protocol version codes and parameters.

use super::messages::Reader;

/// Request codes that share the startup packet's position.
pub const SSL_REQUEST: i32 = 80877103;
pub const GSSENC_REQUEST: i32 = 80877104;
pub const CANCEL_REQUEST: i32 = 80877102;
/// Protocol 3.0.
pub const PROTOCOL_3_0: i32 = 196608;

/// The largest startup-phase packet accepted.
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// What the first packet of a connection asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// Protocol 3.x startup; `minor` > 0 is negotiated down to 3.0.
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
}

/// Why a startup packet was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    Version { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
}

/// Parses a startup-phase packet (without its length word).
pub fn parse(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    let mut r = Reader::new(packet);
    let code = r.i32().ok_or(StartupError::Malformed("too short"))?;
    match code {
        SSL_REQUEST => Ok(StartupPacket::Ssl),
        GSSENC_REQUEST => Ok(StartupPacket::GssEnc),
        CANCEL_REQUEST => {
            let pid = r
                .i32()
                .ok_or(StartupError::Malformed("short cancel request"))?;
            let secret = r
                .i32()
                .ok_or(StartupError::Malformed("short cancel request"))?;
            Ok(StartupPacket::Cancel { pid, secret })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::Version { major, minor });
            }
            let mut params = Vec::new();
            loop {
                let key = r
                    .cstr()
                    .ok_or(StartupError::Malformed("parameter name is not terminated"))?;
                if key.is_empty() {
                    break;
                }
                let value = r
                    .cstr()
                    .ok_or(StartupError::Malformed("parameter value is not terminated"))?;
                params.push((key.to_string(), value.to_string()));
            }
            if !r.rest().is_empty() {
                return Err(StartupError::Malformed("bytes after the parameter list"));
            }
            Ok(StartupPacket::Startup { minor, params })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)], version: i32) -> Vec<u8> {
        let mut v = version.to_be_bytes().to_vec();
        for (k, val) in params {
            v.extend_from_slice(k.as_bytes());
            v.push(0);
            v.extend_from_slice(val.as_bytes());
            v.push(0);
        }
        v.push(0);
        v
    }

    #[test]
    fn parses_startup_parameters() {
        let p = parse(&startup(
            &[("user", "app"), ("database", "app")],
            PROTOCOL_3_0,
        ))
        .unwrap();
        assert_eq!(
            p,
            StartupPacket::Startup {
                minor: 0,
                params: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "app".into())
                ]
            }
        );
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        assert!(matches!(
            parse(&startup(&[], 2 << 16)),
            Err(StartupError::Version { major: 2, .. })
        ));
        assert!(parse(&[1, 2]).is_err());
        assert!(parse(&[0, 3, 0, 0, b'u', b's']).is_err());
        assert_eq!(
            parse(&SSL_REQUEST.to_be_bytes()).unwrap(),
            StartupPacket::Ssl
        );
        let mut c = CANCEL_REQUEST.to_be_bytes().to_vec();
        c.extend_from_slice(&7i32.to_be_bytes());
        c.extend_from_slice(&9i32.to_be_bytes());
        assert_eq!(
            parse(&c).unwrap(),
            StartupPacket::Cancel { pid: 7, secret: 9 }
        );
    }
}
