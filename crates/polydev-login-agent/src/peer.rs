//! The agent's WebRTC peer (webrtc-rs): it answers the user's offer, trickles its candidates
//! through the server, and serves the three data channels the viewer opens (`screen`, `input`,
//! `control`; see [`crate::stream`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCIceServer, RTCPeerConnectionIceEvent, RTCPeerConnectionState,
    RTCSessionDescription,
};

use crate::server::IceServer;
use crate::stream;

/// What the peer tells the agent's main loop.
#[derive(Debug)]
pub enum PeerEvent {
    /// A local candidate to send to the user (the signalling message, ready to post).
    Candidate(Value),
    Connected,
    /// The connection failed or closed.
    Disconnected(String),
    /// An `input` message to perform in the browser.
    Input(Value),
}

/// A frame is not sent while the screen channel still holds this much unsent: the viewer
/// gets the newest picture instead of a growing backlog.
const MAX_BACKLOG: usize = 1024 * 1024;

/// State shared by the peer's callbacks and the agent.
pub struct Shared {
    screen: std::sync::Mutex<Option<Arc<dyn DataChannel>>>,
    last_frame: std::sync::Mutex<Option<Arc<Vec<u8>>>>,
    frame_id: AtomicU32,
    events: mpsc::UnboundedSender<PeerEvent>,
}

impl Shared {
    pub fn new(events: mpsc::UnboundedSender<PeerEvent>) -> Arc<Shared> {
        Arc::new(Shared {
            screen: std::sync::Mutex::new(None),
            last_frame: std::sync::Mutex::new(None),
            frame_id: AtomicU32::new(0),
            events,
        })
    }

    /// Keeps `frame` as the latest picture and sends it to the viewer if a screen channel is
    /// open and not backed up.
    pub async fn frame(&self, frame: Vec<u8>) {
        if frame.len() > stream::MAX_FRAME {
            return;
        }
        let frame = Arc::new(frame);
        *self.last_frame.lock().unwrap() = Some(frame.clone());
        let channel = self.screen.lock().unwrap().clone();
        if let Some(channel) = channel {
            self.send_frame(&channel, &frame).await;
        }
    }

    async fn send_frame(&self, channel: &Arc<dyn DataChannel>, frame: &[u8]) {
        if channel.outstanding_bytes().await.unwrap_or(0) > MAX_BACKLOG {
            return;
        }
        let id = self.frame_id.fetch_add(1, Ordering::Relaxed);
        for piece in stream::chunk_frame(id, frame) {
            if channel.send(piece).await.is_err() {
                return;
            }
        }
    }
}

struct Handler {
    shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let _ = self.shared.events.send(PeerEvent::Candidate(json!({
                "type": "candidate",
                "candidate": {
                    "candidate": init.candidate,
                    "sdpMid": init.sdp_mid,
                    "sdpMLineIndex": init.sdp_mline_index,
                },
            })));
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let event = match state {
            RTCPeerConnectionState::Connected => PeerEvent::Connected,
            RTCPeerConnectionState::Failed => {
                PeerEvent::Disconnected("WebRTC connection failed".into())
            }
            RTCPeerConnectionState::Closed => {
                PeerEvent::Disconnected("WebRTC connection closed".into())
            }
            _ => return,
        };
        let _ = self.shared.events.send(event);
    }

    async fn on_data_channel(&self, channel: Arc<dyn DataChannel>) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let Ok(label) = channel.label().await else {
                return;
            };
            while let Some(event) = channel.poll().await {
                match event {
                    DataChannelEvent::OnOpen if label == "screen" => {
                        *shared.screen.lock().unwrap() = Some(channel.clone());
                        // Chromium sends frames only when the page changes: the viewer gets the
                        // current picture at once.
                        let last = shared.last_frame.lock().unwrap().clone();
                        if let Some(frame) = last {
                            shared.send_frame(&channel, &frame).await;
                        }
                    }
                    DataChannelEvent::OnMessage(message) => {
                        let Ok(value) = serde_json::from_slice::<Value>(&message.data) else {
                            continue;
                        };
                        match label.as_str() {
                            "input" => {
                                let _ = shared.events.send(PeerEvent::Input(value));
                            }
                            "control" => {
                                if let Some(reply) = stream::control_reply(&value) {
                                    let _ = channel.send_text(&reply.to_string()).await;
                                }
                            }
                            _ => {}
                        }
                    }
                    DataChannelEvent::OnClose => {
                        if label == "screen" {
                            let mut screen = shared.screen.lock().unwrap();
                            if screen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &channel)) {
                                *screen = None;
                            }
                        }
                        break;
                    }
                    _ => {}
                }
            }
        });
    }
}

/// A peer connection that answered one offer.
pub struct Peer {
    connection: Box<dyn PeerConnection>,
}

impl Peer {
    /// Answers `offer_sdp`; returns the peer and the answer's SDP. Candidates trickle out as
    /// [`PeerEvent::Candidate`].
    pub async fn answer(
        offer_sdp: String,
        ice_servers: &[IceServer],
        udp: &str,
        shared: Arc<Shared>,
    ) -> Result<(Peer, String), String> {
        let servers = ice_servers
            .iter()
            .map(|s| RTCIceServer {
                urls: s.urls.clone(),
                username: s.username.clone().unwrap_or_default(),
                credential: s.credential.clone().unwrap_or_default(),
            })
            .collect();
        let connection = PeerConnectionBuilder::new()
            .with_configuration(
                RTCConfigurationBuilder::new()
                    .with_ice_servers(servers)
                    .build(),
            )
            .with_handler(Arc::new(Handler { shared }))
            .with_udp_addrs(vec![udp.to_string()])
            .with_data_channel_send_buffer_limit(4 * 1024 * 1024)
            .build()
            .await
            .map_err(|e| format!("WebRTC peer: {e}"))?;
        let offer = RTCSessionDescription::offer(offer_sdp).map_err(|e| format!("offer: {e}"))?;
        connection
            .set_remote_description(offer)
            .await
            .map_err(|e| format!("offer: {e}"))?;
        let answer = connection
            .create_answer(None)
            .await
            .map_err(|e| format!("answer: {e}"))?;
        connection
            .set_local_description(answer)
            .await
            .map_err(|e| format!("answer: {e}"))?;
        let sdp = connection
            .local_description()
            .await
            .ok_or("no local description")?
            .sdp;
        Ok((
            Peer {
                connection: Box::new(connection),
            },
            sdp,
        ))
    }

    /// Adds a candidate of the user (`{candidate, sdpMid, sdpMLineIndex}`); an empty candidate
    /// (end of candidates) is ignored.
    pub async fn add_candidate(&self, candidate: &Value) -> Result<(), String> {
        let init = RTCIceCandidateInit {
            candidate: candidate
                .get("candidate")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            sdp_mid: candidate
                .get("sdpMid")
                .and_then(Value::as_str)
                .map(str::to_string),
            sdp_mline_index: candidate
                .get("sdpMLineIndex")
                .and_then(Value::as_u64)
                .and_then(|i| u16::try_from(i).ok()),
            ..Default::default()
        };
        if init.candidate.is_empty() {
            return Ok(());
        }
        self.connection
            .add_ice_candidate(init)
            .await
            .map_err(|e| format!("candidate: {e}"))
    }

    pub async fn close(self) {
        let _ = self.connection.close().await;
    }
}
