-- Sample schema of the compose source (run once by the postgres image at first start).
CREATE TABLE grants (
    id         int PRIMARY KEY,
    office     text NOT NULL,
    title      text NOT NULL,
    amount     numeric(12,2) NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE budget_lines (
    id         int PRIMARY KEY,
    grant_id   int NOT NULL,
    category   text NOT NULL,
    amount     numeric(12,2) NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO grants (id, office, title, amount)
SELECT g, 'hq', 'Grant #' || g, 1000 * g FROM generate_series(1, 20) AS g;
