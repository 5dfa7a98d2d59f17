"""The DuckDB feature store's tables: written once by workers/publish.py, read by backend/store.py.

One immutable file per run (runs/<id>/features.duckdb). Layers are 0-based transformer
blocks; layer L's SAE reads the residual stream after block L (HF hidden_states[L + 1]).
"""

STORE_FILENAME = "features.duckdb"
STORE_VERSION = 3

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
"""

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
