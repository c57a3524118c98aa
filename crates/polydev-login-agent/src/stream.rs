//! The stream protocol of the data channels (docs/login.md, "The stream protocol").
//!
//! - `screen` (agent → user): each JPEG frame of the screencast is cut into binary messages
//!   `[u32 frame_id BE][u16 index BE][u16 count BE][payload ≤ 16 KiB]`; the viewer draws a
//!   frame once it holds all `count` pieces of it (a newer frame replaces an unfinished one).
//! - `input` (user → agent): JSON `{"t":"mouse",…}`, `{"t":"key",…}`, `{"t":"paste","text"}`,
//!   turned into DevTools `Input.*` calls by [`input_to_cdp`].
//! - `control` (both ways): `{"t":"ping","id","ts"}` answered at once by
//!   `{"t":"pong","id","ts"}` with the same values, so the viewer measures the round trip.

use bytes::{BufMut, BytesMut};
use serde_json::{Value, json};

/// Largest payload of one `screen` message (browsers take 16 KiB messages everywhere).
pub const CHUNK_PAYLOAD: usize = 16 * 1024;
/// Header of a `screen` message: frame id, index, count.
pub const CHUNK_HEADER: usize = 8;
/// Largest frame the agent sends (a bigger one is dropped): `u16::MAX` pieces is far beyond it.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;
/// Longest pasted text.
pub const MAX_PASTE: usize = 4096;

/// Cuts one frame into `screen` messages. An empty frame is one empty piece.
pub fn chunk_frame(frame_id: u32, frame: &[u8]) -> Vec<BytesMut> {
    let pieces: Vec<&[u8]> = if frame.is_empty() {
        vec![&[][..]]
    } else {
        frame.chunks(CHUNK_PAYLOAD).collect()
    };
    let count = u16::try_from(pieces.len()).expect("frames are bounded by MAX_FRAME");
    pieces
        .into_iter()
        .enumerate()
        .map(|(index, payload)| {
            let mut message = BytesMut::with_capacity(CHUNK_HEADER + payload.len());
            message.put_u32(frame_id);
            message.put_u16(index as u16);
            message.put_u16(count);
            message.put_slice(payload);
            message
        })
        .collect()
}

/// Reassembles frames from `screen` messages (the viewer does the same in JavaScript; this
/// one is for tests and tools).
#[derive(Default)]
pub struct Reassembler {
    frame_id: Option<u32>,
    pieces: Vec<Option<Vec<u8>>>,
}

impl Reassembler {
    /// Takes one message; returns a whole frame when this message completed it.
    pub fn push(&mut self, message: &[u8]) -> Option<(u32, Vec<u8>)> {
        if message.len() < CHUNK_HEADER {
            return None;
        }
        let frame_id = u32::from_be_bytes(message[0..4].try_into().ok()?);
        let index = u16::from_be_bytes(message[4..6].try_into().ok()?) as usize;
        let count = u16::from_be_bytes(message[6..8].try_into().ok()?) as usize;
        if count == 0 || index >= count {
            return None;
        }
        if self.frame_id != Some(frame_id) || self.pieces.len() != count {
            self.frame_id = Some(frame_id);
            self.pieces = vec![None; count];
        }
        self.pieces[index] = Some(message[CHUNK_HEADER..].to_vec());
        if self.pieces.iter().all(Option::is_some) {
            let frame = self.pieces.drain(..).flatten().flatten().collect();
            self.frame_id = None;
            return Some((frame_id, frame));
        }
        None
    }
}

/// Why an input message was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct BadInput(pub &'static str);

/// One `input` message as the DevTools call that performs it: `(method, params)`.
pub fn input_to_cdp(message: &Value) -> Result<(&'static str, Value), BadInput> {
    let field = |name: &str| message.get(name);
    let text = |name: &str, max: usize| -> Result<String, BadInput> {
        match field(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) if s.chars().count() <= max => Ok(s.clone()),
            Some(Value::String(_)) => Err(BadInput("text too long")),
            Some(_) => Err(BadInput("not a string")),
        }
    };
    let number = |name: &str| -> Result<f64, BadInput> {
        field(name)
            .and_then(Value::as_f64)
            .filter(|n| n.is_finite() && (-100_000.0..=100_000.0).contains(n))
            .ok_or(BadInput("missing or bad coordinate"))
    };
    let modifiers = field("modifiers").and_then(Value::as_u64).unwrap_or(0) & 0xf;
    match field("t").and_then(Value::as_str) {
        Some("mouse") => {
            let kind = match field("type").and_then(Value::as_str) {
                Some(k @ ("mousePressed" | "mouseReleased" | "mouseMoved" | "mouseWheel")) => k,
                _ => return Err(BadInput("unknown mouse event type")),
            };
            let button = match field("button").and_then(Value::as_str).unwrap_or("none") {
                b @ ("none" | "left" | "middle" | "right" | "back" | "forward") => b,
                _ => return Err(BadInput("unknown mouse button")),
            };
            let click_count = field("clickCount")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .min(3);
            let mut params = json!({
                "type": kind,
                "x": number("x")?,
                "y": number("y")?,
                "button": button,
                "clickCount": click_count,
                "modifiers": modifiers,
            });
            if kind == "mouseWheel" {
                params["deltaX"] = json!(field("deltaX").and_then(Value::as_f64).unwrap_or(0.0));
                params["deltaY"] = json!(field("deltaY").and_then(Value::as_f64).unwrap_or(0.0));
            }
            Ok(("Input.dispatchMouseEvent", params))
        }
        Some("key") => {
            let kind = match field("type").and_then(Value::as_str) {
                Some(k @ ("keyDown" | "keyUp" | "rawKeyDown" | "char")) => k,
                _ => return Err(BadInput("unknown key event type")),
            };
            let key = text("key", 32)?;
            let code = text("code", 32)?;
            let typed = text("text", 4)?;
            let mut params = json!({ "type": kind, "modifiers": modifiers });
            if !key.is_empty() {
                params["key"] = json!(key);
            }
            if !code.is_empty() {
                params["code"] = json!(code);
            }
            if !typed.is_empty() {
                params["text"] = json!(typed);
            }
            // Keys without text (Enter, Tab, Backspace, arrows) need their virtual key code
            // for Chromium to act on them.
            if let Some(vk) = virtual_key_code(&key) {
                params["windowsVirtualKeyCode"] = json!(vk);
                if key == "Enter" && kind == "keyDown" {
                    params["text"] = json!("\r");
                }
            }
            Ok(("Input.dispatchKeyEvent", params))
        }
        Some("paste") => {
            let pasted = text("text", MAX_PASTE)?;
            Ok(("Input.insertText", json!({ "text": pasted })))
        }
        _ => Err(BadInput("unknown input message")),
    }
}

fn virtual_key_code(key: &str) -> Option<u32> {
    Some(match key {
        "Backspace" => 8,
        "Tab" => 9,
        "Enter" => 13,
        "Escape" => 27,
        "PageUp" => 33,
        "PageDown" => 34,
        "End" => 35,
        "Home" => 36,
        "ArrowLeft" => 37,
        "ArrowUp" => 38,
        "ArrowRight" => 39,
        "ArrowDown" => 40,
        "Delete" => 46,
        _ => return None,
    })
}

/// The answer to a `control` message, if it is a ping.
pub fn control_reply(message: &Value) -> Option<Value> {
    (message.get("t")?.as_str()? == "ping").then(|| {
        json!({
            "t": "pong",
            "id": message.get("id").cloned().unwrap_or(Value::Null),
            "ts": message.get("ts").cloned().unwrap_or(Value::Null),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_into_pieces_with_their_header_and_put_back_together() {
        let frame: Vec<u8> = (0..(CHUNK_PAYLOAD * 2 + 10)).map(|i| i as u8).collect();
        let pieces = chunk_frame(7, &frame);
        assert_eq!(pieces.len(), 3);
        assert_eq!(&pieces[0][..8], &[0, 0, 0, 7, 0, 0, 0, 3]);
        assert_eq!(&pieces[2][..8], &[0, 0, 0, 7, 0, 2, 0, 3]);
        assert!(
            pieces
                .iter()
                .all(|p| p.len() <= CHUNK_HEADER + CHUNK_PAYLOAD)
        );
        let mut r = Reassembler::default();
        // Out of order, with a stale piece of an older frame in between.
        assert_eq!(r.push(&pieces[2]), None);
        assert_eq!(r.push(&pieces[0]), None);
        assert_eq!(r.push(&pieces[1]), Some((7, frame)));
        assert_eq!(chunk_frame(1, &[]).len(), 1);
    }

    #[test]
    fn a_newer_frame_replaces_an_unfinished_one() {
        let old = chunk_frame(1, &vec![1; CHUNK_PAYLOAD + 1]);
        let new = chunk_frame(2, &[9; 5]);
        let mut r = Reassembler::default();
        assert_eq!(r.push(&old[0]), None);
        assert_eq!(r.push(&new[0]), Some((2, vec![9; 5])));
        assert_eq!(r.push(&[0, 1]), None, "short messages are ignored");
    }

    #[test]
    fn input_messages_become_devtools_calls() {
        let (m, p) = input_to_cdp(&json!({"t":"mouse","type":"mousePressed","x":10.5,"y":20,"button":"left","clickCount":1})).unwrap();
        assert_eq!(m, "Input.dispatchMouseEvent");
        assert_eq!(p["x"], 10.5);
        assert_eq!(p["button"], "left");
        let (m, p) = input_to_cdp(
            &json!({"t":"key","type":"keyDown","key":"a","code":"KeyA","text":"a","modifiers":0}),
        )
        .unwrap();
        assert_eq!(m, "Input.dispatchKeyEvent");
        assert_eq!(p["text"], "a");
        let (_, p) =
            input_to_cdp(&json!({"t":"key","type":"keyDown","key":"Enter","code":"Enter"}))
                .unwrap();
        assert_eq!(p["windowsVirtualKeyCode"], 13);
        let (m, p) = input_to_cdp(&json!({"t":"paste","text":"s3cret"})).unwrap();
        assert_eq!((m, p), ("Input.insertText", json!({"text":"s3cret"})));
    }

    #[test]
    fn bad_input_is_refused() {
        for bad in [
            json!({"t":"mouse","type":"mouseExplode","x":1,"y":1}),
            json!({"t":"mouse","type":"mouseMoved","x":"1","y":1}),
            json!({"t":"mouse","type":"mouseMoved","x":1e9,"y":1}),
            json!({"t":"mouse","type":"mouseMoved","x":1,"y":1,"button":"nose"}),
            json!({"t":"key","type":"keyDown","text":"too long"}),
            json!({"t":"paste","text":"x".repeat(MAX_PASTE + 1)}),
            json!({"t":"paste","text":5}),
            json!({"t":"eval","code":"1"}),
            json!([]),
        ] {
            assert!(input_to_cdp(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pings_are_answered_with_their_id_and_timestamp() {
        assert_eq!(
            control_reply(&json!({"t":"ping","id":3,"ts":12.5})),
            Some(json!({"t":"pong","id":3,"ts":12.5}))
        );
        assert_eq!(control_reply(&json!({"t":"pong","id":3})), None);
    }
}
