-- Acks, nacks and lease extensions look each lease up by its whole primary
-- key, one row at a time, so that their plan cannot depend on statistics.
--
-- Why: as one statement (`WHERE group_id = $1 AND seq = ANY($2)`), a plan
-- made while `deliveries` was small (every session's generic plan is made on
-- its sixth run, early in its life) uses only `group_id` as the index
-- condition, and then reads every index entry of the group, the dead ones
-- of acked rows included, until a vacuum removes them. Measured at 5,000
-- messages/s: 10,000-20,000 entries read per ack statement, 0.7 ms per
-- statement, 57 us per acked row, the queue's largest cost in Postgres.
-- A lookup by (group_id, seq) reads one entry whatever the table holds.
CREATE FUNCTION ack_leases(g integer, seqs bigint[], tokens uuid[])
RETURNS SETOF bigint LANGUAGE plpgsql AS $$
DECLARE
    done bigint;
BEGIN
    FOR i IN 1 .. coalesce(array_length(seqs, 1), 0) LOOP
        DELETE FROM deliveries
         WHERE group_id = g AND seq = seqs[i] AND lease_token = tokens[i]
           AND visible_at > now()
        RETURNING seq INTO done;
        IF FOUND THEN
            RETURN NEXT done;
        END IF;
    END LOOP;
END
$$;

-- Ends the leases now; the messages come back after `delay_ms`.
CREATE FUNCTION nack_leases(g integer, seqs bigint[], tokens uuid[], delay_ms float8)
RETURNS SETOF bigint LANGUAGE plpgsql AS $$
DECLARE
    done bigint;
BEGIN
    FOR i IN 1 .. coalesce(array_length(seqs, 1), 0) LOOP
        UPDATE deliveries
           SET lease_token = NULL, last_consumer = NULL,
               visible_at = now() + make_interval(secs => delay_ms / 1000)
         WHERE group_id = g AND seq = seqs[i] AND lease_token = tokens[i]
           AND visible_at > now()
        RETURNING seq INTO done;
        IF FOUND THEN
            RETURN NEXT done;
        END IF;
    END LOOP;
END
$$;

-- Extends current leases to `lease_ms` from now; returns each new end.
CREATE FUNCTION extend_leases(g integer, seqs bigint[], tokens uuid[], lease_ms float8)
RETURNS TABLE (seq bigint, until timestamptz) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(seqs, 1), 0) LOOP
        UPDATE deliveries d
           SET visible_at = clock_timestamp() + make_interval(secs => lease_ms / 1000)
         WHERE d.group_id = g AND d.seq = seqs[i] AND d.lease_token = tokens[i]
           AND d.visible_at > now()
        RETURNING d.seq, d.visible_at INTO seq, until;
        IF FOUND THEN
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;
