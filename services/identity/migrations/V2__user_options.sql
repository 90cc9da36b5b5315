-- Keystone's per-user option: failed logins never lock this account (the
-- failures are still logged and counted). Bootstrap sets it for the admin.
ALTER TABLE users ADD COLUMN ignore_lockout_failure_attempts boolean NOT NULL DEFAULT false;
