-- The consumer session that held a delivery's latest lease. When that lease
-- ends unsettled, the same session may claim it again only after a grace
-- during which any other consumer of the group with free credits takes it
-- first: a hung consumer (stream open, never acking) no longer takes every
-- redelivery up to the dead-letter topic. A nack clears it.
ALTER TABLE deliveries ADD COLUMN last_consumer uuid;
