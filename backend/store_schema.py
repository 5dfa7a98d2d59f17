"""The DuckDB feature store's tables: written once by workers/publish.py, read by backend/store.py.

One immutable file per run (runs/<id>/features.duckdb). Layers are 0-based transformer
blocks; layer L's SAE reads the residual stream after block L (HF hidden_states[L + 1]).
"""

STORE_FILENAME = "features.duckdb"
STORE_VERSION = 5

SCHEMA = """
CREATE TABLE run_info (
    key VARCHAR PRIMARY KEY,        -- run_id, name, model, adapter, dataset, config_yaml,
    value VARCHAR                   -- created_at, store_version, n_texts, n_tokens, ...
);

CREATE TABLE texts (
    text_id INTEGER PRIMARY KEY,
    split VARCHAR,                  -- 'train' (regression fit) or 'heldout'
    text VARCHAR,
    reward DOUBLE,                  -- the dataset's own reward (e.g. VADER); NULL if none
    score DOUBLE,                   -- the reward model's (final) score
    n_tokens INTEGER,
    reward_position INTEGER         -- token index the final score is read from
);

-- Every score the reward model gives: one per text, or one per step for a process RM.
-- The regression has one row per reward read.
CREATE TABLE reward_reads (
    read_id INTEGER PRIMARY KEY,
    text_id INTEGER,
    position INTEGER,               -- token index inside the text
    score DOUBLE
);

CREATE TABLE layers (
    layer INTEGER PRIMARY KEY,
    hook_name VARCHAR,
    sae_path VARCHAR,               -- SAELens directory, relative to the run directory
    architecture VARCHAR,
    d_in INTEGER,
    d_sae INTEGER,
    k INTEGER,                      -- TopK k (NULL for other architectures)
    mse DOUBLE,
    explained_variance DOUBLE,      -- on held-out tokens
    l0 DOUBLE,
    dead_fraction DOUBLE,           -- share of features that never fired in the analysis pass
    pooling VARCHAR,                -- how token features become one row per text
    r2_train DOUBLE,
    r2_heldout DOUBLE,
    r2_cv DOUBLE,                   -- out-of-fold R² on the training texts at the chosen alpha
    ridge_alpha DOUBLE,             -- the penalty cross-validation chose (for regression_method)
    regression_method VARCHAR,      -- 'ridge' or 'lasso'
    merge_correlated DOUBLE,        -- features correlated above this were fitted as one column; NULL: off
    merge_min_cosine DOUBLE,        -- ... when their decoder directions' cosine was also above this
    weight_effect_agreement DOUBLE, -- Pearson r of weight with reward_effect over features that fired:
                                    -- do the weights point where the model's gradients do? NULL: no effect
    cv_folds INTEGER,
    probe_r2_train DOUBLE,          -- baseline: ridge on the layer's pooled raw residual stream
    probe_r2_heldout DOUBLE,
    probe_alpha DOUBLE,
    n_train INTEGER,
    n_heldout INTEGER,
    reward_recovered DOUBLE,        -- 1 - reward_mae_sae / reward_mae_zero; NULL if zeroing changes nothing
    reward_mae_sae DOUBLE,          -- mean |RM score with the SAE reconstruction spliced in - score|
    reward_mae_zero DOUBLE          -- mean |RM score with the layer's output zeroed - score|
);

CREATE TABLE features (
    layer INTEGER,
    feature INTEGER,
    frequency DOUBLE,               -- share of analysed tokens where the feature is > 0
    mean_activation DOUBLE,         -- mean over the tokens where it fires
    max_activation DOUBLE,
    weight DOUBLE,                  -- regression weight: reward per unit of activation
    std_weight DOUBLE,              -- weight x the feature's std over training texts: reward per 1 SD
    weight_se DOUBLE,               -- standard error of the weight (fold jackknife or bootstrap); NULL: none
    weight_group INTEGER,           -- near-duplicates fitted as one column share its weight: the group's
                                    -- smallest feature id (the feature itself when fitted alone)
    weight_group_size INTEGER,      -- features in that group (1: fitted alone)
    top_token VARCHAR,              -- the token at the feature's strongest context
    hist_edges DOUBLE[],            -- activation histogram over firing tokens
    hist_counts BIGINT[],
    reward_correlation DOUBLE,      -- Pearson r of the pooled activation with the RM score, per read
    reward_effect DOUBLE,           -- mean d(score)/d(activation) along the decoder row, where it fires
    top_tokens STRUCT(token VARCHAR, mean_activation DOUBLE, count BIGINT)[],
                                    -- by mean activation over all the token's occurrences;
                                    -- count = how often the feature fired on it
    neighbours INTEGER[],           -- the layer's features nearest by decoder cosine, nearest first
    neighbour_cosines FLOAT[],
    PRIMARY KEY (layer, feature)
);

CREATE TABLE contexts (
    layer INTEGER,
    feature INTEGER,
    kind VARCHAR,                   -- 'top': the strongest activations; 'quantile': random
                                    -- examples per activation bin
    rank INTEGER,                   -- top: 0 = strongest; quantile: by bin, then activation
    bin INTEGER,                    -- quantile: the activation bin; NULL for top contexts
    bin_low DOUBLE,                 -- quantile: the bin covers [bin_low, bin_high)
    bin_high DOUBLE,
    text_id INTEGER,
    position INTEGER,               -- token index of the peak inside the text
    activation DOUBLE,
    window_start INTEGER,           -- token index of tokens[0] inside the text
    tokens VARCHAR[],               -- the window's tokens, as the tokenizer spells them
    acts FLOAT[],                   -- the feature's activation on each window token
    PRIMARY KEY (layer, feature, kind, rank)
);

-- Token search: every (layer, token, feature) where the token is one of the feature's top
-- tokens or appears in one of its top contexts. Derived from the two tables above when the
-- store is written (SEARCH_INDEX_SQL); tokens are normalised with NORMALISED_TOKEN.
CREATE TABLE feature_tokens (
    layer INTEGER,
    token VARCHAR,
    feature INTEGER
);

-- What a feature page shows, as one zlib-compressed JSON document per feature, derived from
-- the tables above when the store is written (FEATURE_CARD_SQL): its row of `features`, rank
-- by |weight|, the near-duplicates it shares its weight with, nearest features with their
-- weights, both kinds of contexts with their texts' reward, and its place in the default
-- table view. A columnar store reads a feature's list
-- columns a whole 2,048-row vector at a time (~20 ms a page at 32k features a layer); one
-- uncompressed blob behind an index reads in ~1 ms. (DuckDB's own string compression made the
-- cards 6x slower to write, or, with zstd, 50x slower to read one.)
CREATE TABLE feature_cards (
    card_key BIGINT,                -- layer << 32 | feature (CARD_KEY); unique, indexed
    card BLOB USING COMPRESSION uncompressed
);
"""

# After the bulk load: an index built once is far cheaper than one kept up while inserting.
CARD_INDEX_SQL = "CREATE UNIQUE INDEX feature_cards_key ON feature_cards (card_key)"

CARD_KEY = "(({layer})::BIGINT << 32) | ({feature})"

# A token as search sees it: lower case, without WordPiece's "##" or the space marks of
# byte-level BPE ("Ġ") and SentencePiece ("▁"). The reader applies it to what the user types.
NORMALISED_TOKEN = "lower(regexp_replace({}, '^(##|\u0120|\u2581)', ''))"

SEARCH_INDEX_SQL = f"""
INSERT INTO feature_tokens
SELECT DISTINCT layer, {NORMALISED_TOKEN.format("token")} AS token, feature FROM (
    SELECT layer, feature, unnest(tokens) AS token FROM contexts WHERE kind = 'top'
    UNION ALL
    SELECT layer, feature, unnest(top_tokens).token AS token FROM features
) WHERE token IS NOT NULL AND token <> ''
ORDER BY layer, token, feature
"""

# One layer's cards as (card_key, JSON text), $1 = the layer, in key order; the writer compresses them. The default view is the layer table's
# default sort (weight, largest first), so j/k from a plain feature link need no query.
FEATURE_CARD_SQL = f"""
WITH layer_features AS (
    SELECT *,
           CASE WHEN weight IS NULL THEN 1
                ELSE rank() OVER (ORDER BY abs(weight) DESC NULLS LAST) END AS abs_weight_rank,
           count(*) OVER () AS n_features,
           row_number() OVER by_weight - 1 AS view_index,
           lag(feature) OVER by_weight AS view_previous,
           lead(feature) OVER by_weight AS view_next
    FROM features WHERE layer = $1
    WINDOW by_weight AS (ORDER BY weight DESC NULLS LAST, feature)
),
group_lists AS (
    SELECT a.feature, list(struct_pack(feature := b.feature, top_token := b.top_token, frequency := b.frequency)
                           ORDER BY b.feature) AS weight_group_members
    FROM layer_features a JOIN layer_features b ON a.weight_group = b.weight_group AND a.feature <> b.feature
    WHERE a.weight_group_size > 1
    GROUP BY a.feature
),
neighbour_ids AS (
    SELECT feature, unnest(neighbours) AS neighbour, unnest(neighbour_cosines) AS cosine,
           generate_subscripts(neighbours, 1) AS i
    FROM layer_features
),
neighbour_lists AS (
    SELECT n.feature, list(struct_pack(feature := g.feature, weight := g.weight, frequency := g.frequency,
                                       top_token := g.top_token, cosine := n.cosine) ORDER BY n.i) AS neighbours
    FROM neighbour_ids n JOIN layer_features g ON g.feature = n.neighbour
    GROUP BY n.feature
),
context_rows AS (
    SELECT c.feature, c.kind, c.rank,
           struct_pack(rank := c.rank, bin := c.bin, bin_low := c.bin_low, bin_high := c.bin_high,
                       text_id := c.text_id, position := c.position, activation := c.activation,
                       window_start := c.window_start, tokens := c.tokens, acts := c.acts,
                       reward := t.reward, score := t.score, split := t.split) AS context
    FROM contexts c LEFT JOIN texts t USING (text_id)
    WHERE c.layer = $1
),
context_lists AS (
    SELECT feature,
           list(context ORDER BY rank) FILTER (WHERE kind = 'top') AS top_contexts,
           list(context ORDER BY rank) FILTER (WHERE kind = 'quantile') AS quantile_contexts
    FROM context_rows GROUP BY feature
)
SELECT {CARD_KEY.format(layer="f.layer", feature="f.feature")},
       to_json(struct_pack(
           feature := f.feature, weight := f.weight, std_weight := f.std_weight, weight_se := f.weight_se,
           weight_group := f.weight_group, weight_group_size := f.weight_group_size,
           weight_group_members := g.weight_group_members,
           frequency := f.frequency, mean_activation := f.mean_activation, max_activation := f.max_activation,
           top_token := f.top_token, reward_correlation := f.reward_correlation, reward_effect := f.reward_effect,
           hist_edges := f.hist_edges, hist_counts := f.hist_counts, top_tokens := f.top_tokens,
           abs_weight_rank := f.abs_weight_rank, n_features := f.n_features,
           neighbours := n.neighbours,
           contexts := c.top_contexts, quantile_contexts := c.quantile_contexts,
           default_view := struct_pack("index" := f.view_index, total := f.n_features,
                                       previous := f.view_previous, "next" := f.view_next)
       ))::VARCHAR
FROM layer_features f
LEFT JOIN neighbour_lists n USING (feature)
LEFT JOIN group_lists g USING (feature)
LEFT JOIN context_lists c USING (feature)
ORDER BY f.feature
"""
