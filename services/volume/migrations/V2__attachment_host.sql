-- The host whose compute agent made an attachment (NULL: a user made it
-- directly). With the connector's host it says which agent may act on the
-- attachment without a user token.
ALTER TABLE attachments ADD COLUMN made_by_host text;

CREATE INDEX attachments_connector_host ON attachments ((connector ->> 'host'));
CREATE INDEX attachments_made_by_host ON attachments (made_by_host);
