-- ListChanges since a time (appends: `at` grows with id), and the
-- pruner's expiry of the settled webhook delivery log.
CREATE INDEX inventory_changes_at_idx ON inventory_changes (at);
CREATE INDEX webhook_deliveries_settled_idx ON webhook_deliveries (created_at) WHERE state <> 'pending';
