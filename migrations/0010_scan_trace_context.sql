-- The W3C traceparent of the span that created a scan (docs/operations.md,
-- "Traces"): schedulers on any controller parent each Assign's span on it.
-- NULL for scans created untraced, and for every scan stored before it.
ALTER TABLE scans ADD COLUMN trace_parent text;
