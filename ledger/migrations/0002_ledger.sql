-- The double-entry ledger projection, folded from LedgerEntryPosted events.
-- An entry is applied once: its event's entry_id is the primary key, and the
-- projection's topic offsets advance in the same transaction.
CREATE TABLE ledger_entries (
    entry_id       text    PRIMARY KEY,
    transaction_id text    NOT NULL,
    account        text    NOT NULL,
    amount_micro   bigint  NOT NULL,
    kind           text    NOT NULL,
    task_id        text,
    memo           text    NOT NULL DEFAULT '',
    topic          text    NOT NULL,
    partition      integer NOT NULL,
    "offset"       bigint  NOT NULL,
    occurred_at    bigint  NOT NULL
);
CREATE INDEX ledger_entries_transaction ON ledger_entries (transaction_id);
CREATE INDEX ledger_entries_account ON ledger_entries (account);
CREATE INDEX ledger_entries_task ON ledger_entries (task_id) WHERE task_id IS NOT NULL;

CREATE TABLE ledger_accounts (
    account       text   PRIMARY KEY,
    balance_micro bigint NOT NULL,
    -- Only the mint account goes negative: its balance is minus the supply.
    CHECK (balance_micro >= 0 OR account = 'mint')
);
