-- V2 phase 2 (seed): WebRTC signalling on auth_sessions. vnc_url stays for old readers.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE auth_sessions ADD COLUMN IF NOT EXISTS webrtc_offer TEXT;
ALTER TABLE auth_sessions ADD COLUMN IF NOT EXISTS webrtc_answer TEXT;
ALTER TABLE auth_sessions ADD COLUMN IF NOT EXISTS ice_candidates JSONB;
ALTER TABLE auth_sessions ADD COLUMN IF NOT EXISTS signaling_completed_at TIMESTAMPTZ;
