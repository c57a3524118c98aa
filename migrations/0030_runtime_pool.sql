-- Runtime warm pools (issue 10, docs/runtime.md). A warm container belongs to nobody until a
-- user claims it, so runtime_containers.user_id becomes nullable: the table was created by our
-- own V2 migration 0006 and is empty in production, and one row per container from `warming`
-- to `destroyed` keeps the whole lifecycle in one place. A trigger keeps what NOT NULL used to
-- promise where it matters: an assigned or executing container has a user, a container never
-- changes hands, and a destroyed one never comes back.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- No existing client writes this table (it is empty; see above), so none can break:
-- squawk-ignore ban-drop-not-null
ALTER TABLE runtime_containers ALTER COLUMN user_id DROP NOT NULL;
-- Which driver runs it (`local`, `nomad`), so a reconcile loop only judges its own.
ALTER TABLE runtime_containers ADD COLUMN IF NOT EXISTS orchestrator TEXT;
-- SHA-256 (hex) of the per-container bootstrap secret the agent registers with.
ALTER TABLE runtime_containers ADD COLUMN IF NOT EXISTS bootstrap_hash TEXT;
-- The agent's X25519 public key (base64url), registered at start: jobs are sealed to it.
ALTER TABLE runtime_containers ADD COLUMN IF NOT EXISTS agent_public_key TEXT;
ALTER TABLE runtime_containers ADD COLUMN IF NOT EXISTS ready_at TIMESTAMPTZ;
ALTER TABLE runtime_containers ADD COLUMN IF NOT EXISTS destroy_reason TEXT;

CREATE OR REPLACE FUNCTION runtime_containers_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IN ('assigned', 'executing') AND NEW.user_id IS NULL THEN
        RAISE EXCEPTION 'an % runtime container needs a user', NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF OLD.user_id IS NOT NULL AND NEW.user_id IS DISTINCT FROM OLD.user_id THEN
            RAISE EXCEPTION 'runtime container % already belongs to a user', OLD.id
                USING ERRCODE = 'check_violation';
        END IF;
        IF OLD.status = 'destroyed' AND NEW.status IS DISTINCT FROM 'destroyed' THEN
            RAISE EXCEPTION 'runtime container % is destroyed', OLD.id
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS runtime_containers_guard ON runtime_containers;
CREATE TRIGGER runtime_containers_guard
    BEFORE INSERT OR UPDATE ON runtime_containers
    FOR EACH ROW EXECUTE FUNCTION runtime_containers_guard();
