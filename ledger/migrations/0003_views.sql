-- Read models of tasks and nodes, folded from the lifecycle events by
-- ledger.views.ViewProjection (projection name "views" in projection_offsets).
-- Events reach the projection from several topics in any relative order, so
-- every column a later event fills is nullable, counters count each natural
-- key once, and a task's status only moves forward (task_status_rank).

-- The order a task's status may move in; verified and failed are final.
CREATE FUNCTION task_status_rank(status text) RETURNS integer
    LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT CASE status
        WHEN 'submitted' THEN 0
        WHEN 'escrowed' THEN 1
        WHEN 'assigned' THEN 2
        WHEN 'committing' THEN 3
        WHEN 'revealing' THEN 4
        WHEN 'verified' THEN 5
        WHEN 'failed' THEN 5
    END $$;

-- One row per task. A row can exist before its TaskSubmitted arrives (an
-- assignment or a verdict read first); the submission's columns are NULL until then.
CREATE TABLE task_view (
    task_id        text    PRIMARY KEY,
    submitter_id   text,
    workload       text,
    params         jsonb,
    replicas       integer,
    quorum         integer,
    compute_units  bigint,
    price_micro    bigint,   -- the quoted price the submitter agreed to pay
    tier           text,
    status         text    NOT NULL DEFAULT 'submitted' CHECK (status IN
                       ('submitted', 'escrowed', 'assigned', 'committing', 'revealing',
                        'verified', 'failed')),
    submitted_at   bigint,   -- ms since the epoch, from the events' envelopes
    assigned_at    bigint,   -- first assignment
    verified_at    bigint,   -- verdict time, for failed tasks too
    digest         bytea,
    failure_reason text,
    failure_detail text,
    assignments    integer NOT NULL DEFAULT 0 CHECK (assignments >= 0),
    commits        integer NOT NULL DEFAULT 0 CHECK (commits >= 0),
    reveals        integer NOT NULL DEFAULT 0 CHECK (reveals >= 0),
    paid_micro     bigint  NOT NULL DEFAULT 0 CHECK (paid_micro >= 0),
    refunded_micro bigint  NOT NULL DEFAULT 0 CHECK (refunded_micro >= 0)
);
CREATE INDEX task_view_recent ON task_view
    ((coalesce(submitted_at, assigned_at, verified_at)) DESC NULLS LAST, task_id DESC);
CREATE INDEX task_view_status ON task_view (status);

-- One row per placement of a replica: (task, node, attempt).
CREATE TABLE task_replica_view (
    task_id          text    NOT NULL,
    node_id          text    NOT NULL,
    attempt          integer NOT NULL,
    replica_index    integer,  -- NULL while only a commit or reveal has been read
    assigned_at      bigint,
    committed_at     bigint,
    revealed_at      bigint,
    agreed           boolean,  -- from the verdict's contributions
    runtime_ms       bigint,
    penalized_reason text,
    PRIMARY KEY (task_id, node_id, attempt)
);

-- What a verdict or a penalty says about a node's part in a task. Those events
-- carry no attempt, so the facts are kept here by (task, node) and copied onto
-- replica rows whenever either side arrives, in whichever order.
CREATE TABLE task_node_facts (
    task_id          text   NOT NULL,
    node_id          text   NOT NULL,
    agreed           boolean,
    compute_units    bigint,
    penalized_reason text,
    PRIMARY KEY (task_id, node_id)
);

-- One row per node. Like tasks, a row can exist before its NodeRegistered arrives.
CREATE TABLE node_view (
    node_id           text    PRIMARY KEY,
    operator_id       text,
    region            text,
    device_name       text,
    device_class      text,
    tier              text,
    tflops_milli      bigint,
    memory_mb         bigint,
    slots             integer,
    stake_micro       bigint,   -- as registered (the ledger may have locked less)
    registered_at     bigint,   -- the latest registration
    last_heartbeat_at bigint,
    load_permille     integer,
    free_slots        integer,
    tasks_assigned    integer NOT NULL DEFAULT 0 CHECK (tasks_assigned >= 0),
    tasks_agreed      integer NOT NULL DEFAULT 0 CHECK (tasks_agreed >= 0),
    tasks_dissented   integer NOT NULL DEFAULT 0 CHECK (tasks_dissented >= 0),
    penalties         integer NOT NULL DEFAULT 0 CHECK (penalties >= 0),
    earned_micro      bigint  NOT NULL DEFAULT 0 CHECK (earned_micro >= 0),
    slashed_micro     bigint  NOT NULL DEFAULT 0 CHECK (slashed_micro >= 0)
);
