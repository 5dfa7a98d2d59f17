"""The DuckDB feature store's tables: written once by workers/publish.py, read by backend/core/store.py.

One immutable file per run (runs/<id>/features.duckdb). Layers are 0-based transformer
blocks; layer L's SAE reads the residual stream after block L (HF hidden_states[L + 1]).

Every column is defined once, here (TABLES): the DDL, the writer's check of its input, the
reader's column lists, the layer table (its headers, cells, header groups, sort tabs and JSON
twin) and the feature card all come from it. A new column is one Column in its Table below (a
feature column: table=True to have it in the layer table's rows and JSON, sort_key and label to
sort by it, shown=Display(...) to draw it in the layer table, with tabs to offer its sorts
there; it is on the card unless card=False). A column the table sorts by must be drawn in it.
The code that builds the table must then give it -- the writer refuses a table with a column
missing or unknown -- and the test helper gives it a synthetic value by itself.
"""
from __future__ import annotations

from dataclasses import dataclass

STORE_FILENAME = "features.duckdb"
STORE_VERSION = 11


@dataclass(frozen=True)
class Group:
    """What kind of number a layer table column is: named over its columns' headers and after
    its sort tabs' words. The keys of GROUPS are the rankings' kinds (backend/core/rankings.py)."""
    heading: str  # over the headers: "predicts the score (regression)"
    title: str    # ... its hover text
    tag: str      # after a tab's words: "weight (predicts)"


GROUPS = {
    "predicts": Group("predicts the score (regression)", "fitted across the corpus: how well the activation "
                      "predicts the score, not whether the model uses it", "predicts"),
    "gradient": Group("model's gradient", "the model's own gradient: a first-order estimate of zeroing", "gradient"),
    "measured": Group("ablation", "the feature actually zeroed inside the model", "ablation"),
}
WHEN = ("always", "filled", "sorted")


@dataclass(frozen=True)
class Tab:
    """A sort tab above the layer table."""
    sort: str                 # the ?sort= it opens: the column's sort_key, -sort_key or abs_<sort_key>
    label: str | None = None  # its words; None: the sort's label, then its column group's tag ("weight (predicts)")


@dataclass(frozen=True)
class Display:
    """How the layer table draws a feature column (table=True): its header (a link that sorts by
    it when the column has a sort_key) and a cell a row; the page's JSON twin lists the same.
    Columns are drawn group by group (GROUPS' order, then those of no group), in the spec's
    order within a group."""
    heading: str                  # the header's words: "Weight"
    group: str | None = None      # a key of GROUPS: the kind of number, named over the header; None: none
    format: str = "num"           # how its values look (backend/web/routes/formats.py FORMATS): num; weight
    #                               (signed); delta (a signed change in the score); pct (a share, in per cent:
    #                               every frequency); count; text
    cell: str = "number"          # how its cell is drawn (backend/web/feature_table.py CELLS): number; signed
    #                               (coloured by its sign); bar (signed, with a bar to the layer's largest |value|);
    #                               measured (Δ zeroed, coloured as a zeroing, with its CI: reads = (low, high, n));
    #                               token (a token, as tokens are shown)
    title: str = ""               # the header's hover text; {name}: the layer's row's value of name
    hint: str = ""                # a cell's hover text; {name}: the feature's row's value of name
    css: str = ""                 # more classes of its cells ("muted": a secondary number)
    when: str = "always"          # drawn always; filled: where the layer has a value in it (a run that computed
    #                               it); sorted: while the table is sorted by it
    tabs: tuple[Tab, ...] = ()    # its sort tabs (shown where the column is: always, or filled)
    reads: tuple[str, ...] = ()   # the other table columns its cell reads


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    doc: str = ""
    table: bool = False           # read into the layer table's rows (features) and its JSON twin
    sort_key: str | None = None   # the layer table sorts by it: ?sort=<sort_key>, largest first; -<sort_key>
    label: str | None = None      # its name to a reader: "<label>, largest first"
    abs_label: str | None = None  # ... and by its absolute value, as abs_<sort_key>, named so
    card: bool = True             # on the feature card as stored (False: the card shows it otherwise)
    shown: Display | None = None  # drawn in the layer table (table=True), so


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()
    doc: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def ddl(self) -> str:
        parts = [f"    {c.name} {c.sql_type}" for c in self.columns]
        if self.primary_key:
            parts.append(f"    PRIMARY KEY ({', '.join(self.primary_key)})")
        return f"CREATE TABLE {self.name} (\n" + ",\n".join(parts) + "\n);"


@dataclass(frozen=True)
class Sort:
    key: str         # ?sort=key: largest first; ?sort=-key: smallest first
    expression: str  # SQL over the features table
    label: str


def sorts(table: Table) -> tuple[Sort, ...]:
    """The sorts the table's columns offer, in column order."""
    out = []
    for c in table.columns:
        if c.sort_key is not None:
            out.append(Sort(c.sort_key, c.name, c.label or c.name))
            if c.abs_label is not None:
                out.append(Sort(f"abs_{c.sort_key}", f"abs({c.name})", c.abs_label))
    return tuple(out)


TABLES: dict[str, Table] = {t.name: t for t in (
    Table("run_info", (
        Column("key", "VARCHAR", "run_id, name, model, adapter, dataset, config_yaml, created_at, store_version, "
                                 "n_texts, n_tokens, best_layer (absent: no layer has a held-out R²), "
                                 "ranked_texts (feature_texts' N per feature), ..."),
        Column("value", "VARCHAR"),
    ), primary_key=("key",)),

    Table("texts", (
        Column("text_id", "INTEGER"),
        Column("split", "VARCHAR", "'train' (regression fit) or 'heldout'"),
        Column("text", "VARCHAR"),
        Column("reward", "DOUBLE", "the dataset's own reward (e.g. VADER); NULL if none"),
        Column("score", "DOUBLE", "the reward model's (final) score"),
        Column("n_tokens", "INTEGER"),
        Column("reward_position", "INTEGER", "token index the final score is read from"),
        Column("response_start", "INTEGER", "a chat text's response: its first token index; NULL for plain texts"),
        Column("response_end", "INTEGER", "one past the response's last token index"),
    ), primary_key=("text_id",)),

    Table("reward_reads", (
        Column("read_id", "INTEGER"),
        Column("text_id", "INTEGER"),
        Column("position", "INTEGER", "token index inside the text"),
        Column("score", "DOUBLE"),
    ), primary_key=("read_id",),
        doc="Every score the reward model gives: one per text, or one per step for a process RM. "
            "The regression has one row per reward read."),

    Table("layers", (
        Column("layer", "INTEGER"),
        Column("hook_name", "VARCHAR"),
        Column("sae_path", "VARCHAR", "SAELens directory, relative to the run directory"),
        Column("architecture", "VARCHAR"),
        Column("d_in", "INTEGER"),
        Column("d_sae", "INTEGER"),
        Column("k", "INTEGER", "TopK k (NULL for other architectures)"),
        Column("mse", "DOUBLE"),
        Column("explained_variance", "DOUBLE", "on held-out tokens the SAE is meant for (attention sinks left out)"),
        Column("l0", "DOUBLE"),
        Column("dead_fraction", "DOUBLE", "share of features that never fired in the analysis pass on a token the SAE is "
               "meant for (attention sinks left out; every token, even where analysis.tokens reads responses)"),
        Column("sink_max_norm", "DOUBLE", "attention sinks (sinks.rule): tokens whose residual norm exceeds this are "
               "left out of SAE training and every feature read; NULL: no rule"),
        Column("sink_count", "INTEGER", "tokens of the corpus the rule left out at this layer"),
        Column("sink_fraction", "DOUBLE", "... their share of the corpus' tokens"),
        Column("sink_positions", "STRUCT(position INTEGER, count BIGINT)[]",
               "where in their texts they were, most common first"),
        Column("sink_tokens", "STRUCT(token VARCHAR, count BIGINT)[]", "which token strings they were"),
        Column("sink_mean_norm", "DOUBLE", "their mean residual norm; NULL when none was left out"),
        Column("other_mean_norm", "DOUBLE", "the mean residual norm of every other token"),
        Column("other_max_norm", "DOUBLE", "... and the largest"),
        Column("pooling", "VARCHAR", "how token features become one row per text"),
        Column("r2_train", "DOUBLE"),
        Column("r2_heldout", "DOUBLE"),
        Column("r2_cv", "DOUBLE", "out-of-fold R² on the training texts at the chosen alpha"),
        Column("ridge_alpha", "DOUBLE", "the penalty cross-validation chose (for regression_method)"),
        Column("regression_method", "VARCHAR", "'ridge' or 'lasso'"),
        Column("merge_correlated", "DOUBLE", "features correlated above this were fitted as one column; NULL: off"),
        Column("merge_min_cosine", "DOUBLE", "... when their decoder directions' cosine was also above this"),
        Column("weight_effect_agreement", "DOUBLE", "Pearson r of weight with reward_effect over features that "
               "fired: do the weights point where the model's gradients do? NULL: no effect"),
        Column("cv_folds", "INTEGER"),
        Column("probe_r2_train", "DOUBLE", "baseline: ridge on the layer's pooled raw residual stream"),
        Column("probe_r2_heldout", "DOUBLE"),
        Column("probe_alpha", "DOUBLE"),
        Column("n_train", "INTEGER"),
        Column("n_heldout", "INTEGER"),
        Column("reward_recovered", "DOUBLE", "1 - reward_mae_sae / reward_mae_zero; NULL if zeroing changes nothing"),
        Column("reward_mae_sae", "DOUBLE", "mean |RM score with the SAE reconstruction spliced in - score|"),
        Column("reward_mae_zero", "DOUBLE", "mean |RM score with the layer's output zeroed - score| (attention sinks "
               "keep their state, as with the SAE)"),
        # what the model uses, measured (workers/causal.py); NULL where the score is not the model's
        Column("default_ranking", "VARCHAR", "the ranking (backend/core/rankings.py) whose deletion curve moves the "
               "reward most beyond its controls: the layer table's default sort and its 'top N'"),
        Column("faithfulness_measure", "VARCHAR", "how the default ranking is judged: 'signed' (its raisers zeroed "
               "lower the score, its lowerers raise it) or 'abs' (mean |Δ| per text)"),
        Column("faithfulness_effect", "DOUBLE", "the default ranking's top 10 zeroed, on its measure (mean over its "
               "directions): how far the score moves the way the ranking says"),
        Column("faithfulness_control", "DOUBLE", "... the same for frequency-matched random draws (their mean)"),
        Column("faithfulness_relative", "DOUBLE", "(effect - control) / score_spread: what picks the best layer"),
        Column("faithfulness_verdict", "VARCHAR", "beyond_controls (no control draw reaches the effect and the paired "
               "test p < 0.05, in every direction), within_controls, or too_few_controls"),
        Column("faithfulness_draws", "INTEGER", "control draws behind the verdict (the fewest of its directions)"),
        Column("score_spread", "DOUBLE", "standard deviation of the score over the faithfulness texts"),
        Column("reach", "DOUBLE", "the largest |delta - control| of any deletion curve / score_spread: small when "
               "this layer's edits barely reach the score"),
        Column("read_token_gradient_share", "DOUBLE", "share of the score's gradient (norm per token) at the "
               "tokens the score is read at: near 1 when the head reads one token here"),
        Column("calibration_regression_slope", "DOUBLE", "measured single-feature Δ regressed on the regression's "
               "prediction: 1 is calibrated, 0.1 means predictions 10x too large"),
        Column("calibration_regression_r", "DOUBLE"),
        Column("calibration_attribution_slope", "DOUBLE", "... on the attribution's prediction"),
        Column("calibration_attribution_r", "DOUBLE"),
        Column("n_measured", "INTEGER", "features whose single-feature Δ was measured"),
        # paired dictionaries (workers/analyses/pairs.py); NULL where the run has no sae.widths
        Column("pair_width", "INTEGER", "the paired SAE's width (sae.widths' smaller size), trained from the same "
               "activation batches as this layer's SAE"),
        Column("pair_sae_path", "VARCHAR", "its SAELens directory, relative to the run directory"),
        Column("mmcs_to_pair", "DOUBLE", "mean over this SAE's decoder directions of the max cosine with any of the "
               "pair's (MMCS, Marks et al. eq. 2)"),
        Column("mmcs_from_pair", "DOUBLE", "... over the pair's directions, with this SAE's"),
        # preference pairs (workers/analyses/preference.py); NULL where the dataset is not pairs
        Column("spliced_accuracy", "DOUBLE", "pairwise accuracy on held-out pairs with this layer's SAE "
               "reconstruction spliced in"),
        Column("surrogate_accuracy", "DOUBLE", "held-out pairwise accuracy of the surrogate RM: this layer's pooled "
               "SAE features and a linear map fitted with the Bradley–Terry loss on the training pairs"),
        Column("surrogate_train_accuracy", "DOUBLE", "... on the training pairs"),
    ), primary_key=("layer",)),

    Table("features", (
        Column("layer", "INTEGER", card=False),
        Column("feature", "INTEGER", table=True),
        Column("frequency", "DOUBLE", "share of analysed tokens where the feature is > 0",
               table=True, sort_key="frequency", label="frequency",
               shown=Display("Frequency", format="pct", title="per cent of analysed tokens the feature fires on",
                             tabs=(Tab("frequency", "most frequent"),))),
        Column("mean_activation", "DOUBLE", "mean over the tokens where it fires", table=True),
        Column("max_activation", "DOUBLE", table=True, sort_key="max_activation", label="max activation",
               shown=Display("Max act.", tabs=(Tab("max_activation", "strongest activation"),))),
        Column("weight", "DOUBLE", "regression weight: reward per unit of activation",
               table=True, sort_key="weight", label="weight", abs_label="|weight|",
               shown=Display("Weight", "predicts", "weight", "bar", "regression weight: reward per unit of "
                             "activation (predicts)", tabs=(Tab("weight"), Tab("-weight", "most negative weight "
                                                                               "(predicts)"), Tab("abs_weight")))),
        Column("std_weight", "DOUBLE", "weight x the feature's std over training texts: reward per 1 SD",
               table=True, sort_key="std_weight", label="std. weight", abs_label="|std. weight|",
               shown=Display("Std. weight", "predicts", "weight", "signed", "reward per standard deviation of "
                             "activation (predicts)", tabs=(Tab("abs_std_weight"),))),
        Column("weight_se", "DOUBLE", "standard error of the weight (fold jackknife or bootstrap); NULL: none",
               table=True, shown=Display("± SE", "predicts", title="standard error of the weight", css="muted")),
        Column("weight_group", "INTEGER", "near-duplicates fitted as one column share its weight: the group's "
                                          "smallest feature id (the feature itself when fitted alone)"),
        Column("weight_group_size", "INTEGER", "features in that group (1: fitted alone)", table=True),
        Column("top_token", "VARCHAR", "the token at the feature's strongest context", table=True,
               shown=Display("Top token", format="text", cell="token")),
        Column("hist_edges", "DOUBLE[]", "activation histogram over firing tokens"),
        Column("hist_counts", "BIGINT[]"),
        Column("reward_correlation", "DOUBLE", "Pearson r of the pooled activation with the RM score, per read",
               table=True, sort_key="correlation", label="reward correlation",
               shown=Display("Corr.", "predicts", title="Pearson r of the pooled activation with the RM score",
                             tabs=(Tab("correlation"),))),
        Column("reward_effect", "DOUBLE", "mean d(score)/d(activation) along the decoder row, where it fires on "
               "the text's own tokens (special tokens left out, as token pooling does)",
               table=True, sort_key="reward_effect", label="effect per unit",
               shown=Display("Effect/unit", "gradient", "weight", "signed", "effect per unit (gradient): mean "
                             "d(score)/d(activation) along the decoder direction, where it fires",
                             tabs=(Tab("reward_effect"),))),
        Column("attribution", "DOUBLE", "mean contribution to a text's score: activation x d(score)/d(activation) "
               "summed over the text's own tokens (0 where silent; special tokens left out); NULL: never fired on the text "
               "of one whose gradient was taken",
               table=True, sort_key="attribution", label="attribution", abs_label="|attribution|",
               shown=Display("Attribution", "gradient", "weight", "signed", "mean contribution to a text's score: "
                             "activation × d(score)/d(activation), summed over its tokens (gradient)",
                             tabs=(Tab("attribution"),))),
        Column("attribution_abs", "DOUBLE", "mean |contribution| per text", table=True,
               sort_key="attribution_abs", label="mean |attribution|",
               shown=Display("Mean |attr.|", "gradient", title="mean |contribution| per text (gradient)",
                             when="sorted")),
        Column("attribution_share", "DOUBLE", "cov(contribution, score) / var(score): its share of the score's "
               "variance", table=True, sort_key="attribution_share", label="share of score variance",
               shown=Display("Share of var.", "gradient", "pct", title="cov(contribution, score) / var(score): its "
                             "share of the score's variance (gradient)", when="sorted")),
        Column("measured_delta", "DOUBLE", "mean Δ score with the feature zeroed alone (reconstruction error kept) "
               "on held-out texts where it fires; NULL: not measured", table=True, sort_key="measured_delta",
               label="measured Δ", abs_label="|measured Δ|",
               shown=Display("Measured Δ", "measured", "weight", "measured", "mean change in the score with the "
                             "feature zeroed alone, 95% CI (ablation); — not measured: not among the layer's top "
                             "candidates", hint="zeroed alone on {measured_n} reward reads; 95% CI",
                             tabs=(Tab("-measured_delta"),),
                             reads=("measured_delta_low", "measured_delta_high", "measured_n"))),
        Column("measured_delta_low", "DOUBLE", "95% CI of measured_delta", table=True),
        Column("measured_delta_high", "DOUBLE", table=True),
        Column("measured_n", "INTEGER", "reward reads measured_delta is the mean of (0: not measured)", table=True),
        Column("predicted_delta_regression", "DOUBLE", "on the same reads: -weight x pooled activation", table=True),
        Column("predicted_delta_attribution", "DOUBLE", "on the same reads: -contribution", table=True),
        Column("top_tokens", "STRUCT(token VARCHAR, mean_activation DOUBLE, count BIGINT)[]",
               "by mean activation over all the token's occurrences; count = how often the feature fired on it"),
        # the card lists neighbours with their cosines, weights and top tokens instead
        Column("neighbours", "INTEGER[]", "the layer's features nearest by decoder cosine, nearest first",
               card=False),
        Column("neighbour_cosines", "FLOAT[]", card=False),
        Column("pair_max_cosine", "DOUBLE", "max cosine of its decoder direction with the paired (smaller) SAE's: "
               "high is present in both dictionaries; NULL: no pair", table=True, sort_key="pair_cosine",
               label="max cosine in the pair",
               shown=Display("Pair cos.", title="max cosine of the decoder direction with any of the {pair_width}-wide "
                             "paired dictionary's: high is present in both dictionaries",
                             hint="its nearest feature in the paired dictionary: {pair_feature}", css="pair-cosine",
                             when="filled", reads=("pair_feature",))),
        Column("pair_feature", "INTEGER", "the paired SAE's feature reaching it", table=True),
        # base-model transfer (workers/analyses/transfer.py); NULL where the run has no transfer
        Column("base_feature", "INTEGER", "the base model's SAE feature (same layer) whose activations correlate "
               "most with this one's over held-out tokens; NULL: no transfer", table=True),
        Column("base_correlation", "DOUBLE", "Pearson r of the two over those tokens", table=True,
               sort_key="base_correlation", label="base-model correlation",
               shown=Display("Base r", title="Pearson r with the base model's SAE feature (same layer) that "
                             "correlates most with it over held-out tokens", hint="base-model feature {base_feature}",
                             when="sorted", reads=("base_feature",))),
        Column("base_decoder_cosine", "DOUBLE", "cosine of the two decoder directions; NULL where the residual "
               "streams' widths differ"),
        # preference pairs (workers/analyses/preference.py); NULL where the dataset is not pairs
        Column("margin_attribution", "DOUBLE", "mean over held-out pairs of its attribution on the chosen side minus "
               "on the rejected side: its share of the margin score(chosen) - score(rejected)", table=True,
               sort_key="margin_attribution", label="margin attribution", abs_label="|margin attribution|",
               shown=Display("Margin attr.", "gradient", "weight", "signed", "mean over held-out pairs of its "
                             "attribution on the chosen side minus on the rejected side (gradient)", when="sorted",
                             tabs=(Tab("margin_attribution"),))),
        Column("margin_attribution_chosen", "DOUBLE", "mean attribution on the chosen side", table=True),
        Column("margin_attribution_rejected", "DOUBLE", "mean attribution on the rejected side", table=True),
        Column("margin_delta", "DOUBLE", "mean Δ margin with the feature zeroed on both sides (reconstruction error "
               "kept), over held-out pairs where it fires on either side; NULL: not measured", table=True,
               sort_key="margin_delta", label="measured margin Δ", abs_label="|measured margin Δ|",
               shown=Display("Margin Δ", "measured", "weight", "measured", "mean change in the margin with the "
                             "feature zeroed on both sides, 95% CI (ablation); — not measured",
                             hint="zeroed on {margin_delta_n} pairs; 95% CI", when="sorted",
                             reads=("margin_delta_low", "margin_delta_high", "margin_delta_n"))),
        Column("margin_delta_low", "DOUBLE", "95% CI of margin_delta", table=True),
        Column("margin_delta_high", "DOUBLE", table=True),
        Column("margin_delta_n", "INTEGER", "pairs margin_delta is the mean of (0: not measured)", table=True),
        Column("reason_score", "DOUBLE", "ReasonScore (workers/analyses/reason_score.py): the feature's specificity "
               "to reason_score.vocabulary over the corpus's tokens; NULL: not computed", table=True,
               sort_key="reason_score", label="ReasonScore",
               shown=Display("ReasonScore", title="specificity to the run's reason_score.vocabulary", when="sorted",
                             tabs=(Tab("reason_score", "ReasonScore (vocabulary)"),))),
    ), primary_key=("layer", "feature")),

    Table("contexts", (
        Column("layer", "INTEGER"),
        Column("feature", "INTEGER"),
        Column("kind", "VARCHAR", "'top': the strongest activations; 'quantile': random examples per activation bin"),
        Column("rank", "INTEGER", "top: 0 = strongest; quantile: by bin, then activation"),
        Column("bin", "INTEGER", "quantile: the activation bin; NULL for top contexts"),
        Column("bin_low", "DOUBLE", "quantile: the bin covers [bin_low, bin_high)"),
        Column("bin_high", "DOUBLE"),
        Column("text_id", "INTEGER"),
        Column("position", "INTEGER", "token index of the peak inside the text"),
        Column("activation", "DOUBLE"),
        Column("window_start", "INTEGER", "token index of tokens[0] inside the text"),
        Column("tokens", "VARCHAR[]", "the window's tokens, as the tokenizer spells them"),
        Column("acts", "FLOAT[]", "the feature's activation on each window token"),
    ), primary_key=("layer", "feature", "kind", "rank")),

    Table("feature_texts", (
        Column("layer", "INTEGER"),
        Column("feature", "INTEGER"),
        Column("rank", "INTEGER", "0 = the text where the feature's max activation is largest"),
        Column("text_id", "INTEGER"),
        Column("activation", "FLOAT", "the feature's max activation over the text's own tokens (special tokens "
               "left out)"),
    ), doc="Per feature, the texts it fires on most: the top analysis.ranked_texts by activation, only texts "
           "where it fires (workers/ranked_texts.py). What the corpus browser sorts by when it sorts by a "
           "feature; texts outside a feature's top N are not listed there. (layer, feature, rank) is unique, but "
           "not a declared key: its index took 45 MB of the table's 87 on the demo. Rows are written in that "
           "order, so the row groups' zone maps find a feature's rows (~0.6 ms)."),

    Table("faithfulness", (
        Column("layer", "INTEGER"),
        Column("ranking", "VARCHAR", "backend/core/rankings.py"),
        Column("direction", "VARCHAR", "raises (the signed ranking's top raisers), lowers (its top lowerers) or "
               "both (a |value| ranking's top by magnitude)"),
        Column("n", "INTEGER", "the direction's top n zeroed together"),
        Column("features", "INTEGER[]"),
        Column("mean_delta", "DOUBLE", "mean Δ score over the faithfulness texts' reward reads"),
        Column("ci_low", "DOUBLE"),
        Column("ci_high", "DOUBLE"),
        Column("predicted_mean_delta", "DOUBLE", "the regression's prediction"),
        Column("attribution_mean_delta", "DOUBLE", "the first-order (gradient) prediction"),
        Column("predicted_ratio", "DOUBLE", "prediction / measured"),
        Column("attribution_ratio", "DOUBLE"),
        Column("n_reads", "INTEGER"),
        Column("n_fired", "INTEGER", "reads where a chosen feature fires"),
        Column("fired_mean_delta", "DOUBLE", "mean Δ over those reads"),
        Column("control_mean_delta", "DOUBLE", "mean over the random draws of their mean Δ"),
        Column("control_low", "DOUBLE", "the draws' smallest mean Δ"),
        Column("control_high", "DOUBLE", "... and largest"),
        Column("control_draw_means", "DOUBLE[]"),
        Column("difference", "DOUBLE", "chosen - control per read, mean"),
        Column("difference_low", "DOUBLE", "95% CI"),
        Column("difference_high", "DOUBLE"),
        Column("p_value", "DOUBLE", "two-sided sign-flip permutation test of the paired difference"),
        Column("abs_mean_delta", "DOUBLE", "mean |Δ score| over the reads: what the features carry, either way"),
        Column("measure", "VARCHAR", "what the point is judged on: 'signed' (-Δ for raises, +Δ for lowers) or "
               "'abs' (|Δ|), per read"),
        Column("effect", "DOUBLE", "the chosen features' mean on that measure"),
        Column("control_effect", "DOUBLE", "... the control draws' (their mean)"),
        Column("control_effects", "DOUBLE[]", "... each draw's"),
        Column("excess", "DOUBLE", "effect - control_effect: how the rankings are compared"),
        Column("rank_p_value", "DOUBLE", "(1 + draws whose effect reaches the chosen one) / (1 + draws)"),
        Column("effect_p_value", "DOUBLE", "sign-flip permutation test of the per-read difference on the measure"),
        Column("verdict", "VARCHAR", "beyond_controls, within_controls (a draw reaches it, or p >= 0.05) or "
               "too_few_controls (under 10 draws)"),
    ), primary_key=("layer", "ranking", "direction", "n"),
        doc="Deletion curves (workers/faithfulness.py): per layer and ranking, the top n zeroed beside "
            "frequency-matched random draws of the same n."),

    Table("transfer_layers", (
        Column("layer", "INTEGER", "base-model block (the RM features matched are the RM's same layer's)"),
        Column("base_sae_path", "VARCHAR", "the base SAE's SAELens directory, relative to the run directory"),
        Column("d_in", "INTEGER", "the base model's residual-stream width"),
        Column("base_explained_variance", "DOUBLE", "the base SAE's reconstruction, held-out tokens"),
        Column("base_r2_train", "DOUBLE"),
        Column("base_r2_heldout", "DOUBLE", "the RM's score regressed on the base SAE's pooled features "
               "(regression.method and pooling, the RM's held-out texts)"),
        Column("base_probe_r2_heldout", "DOUBLE", "... and on the base model's pooled raw residual stream"),
        Column("rm_r2_heldout", "DOUBLE", "the RM's own layer's held-out R² on the same texts (NULL: the RM has no "
               "SAE there)"),
        Column("rm_probe_r2_heldout", "DOUBLE"),
        Column("n_texts", "INTEGER", "corpus texts the regressions were fitted and scored on (transfer.texts)"),
        Column("n_matched", "INTEGER", "RM features matched (those that fired on the matching tokens)"),
        Column("n_matched_above_0_5", "INTEGER", "... whose best base feature correlates above 0.5"),
        Column("median_base_correlation", "DOUBLE", "median r of the RM features' best matches"),
        Column("mean_decoder_cosine", "DOUBLE", "mean decoder cosine of the matched pairs; NULL: widths differ"),
        Column("match_tokens", "INTEGER", "held-out tokens the correlations are taken over"),
    ), primary_key=("layer",),
        doc="Base-model transfer (workers/analyses/transfer.py): SAEs trained on the base model the RM was tuned "
            "from, on the same training texts; per layer, how well its features predict the RM's score, beside "
            "the RM's own. Empty: no transfer configured."),

    Table("divergence", (
        Column("block", "INTEGER"),
        Column("l2", "DOUBLE", "sqrt of the sum over the block's tensors of the squared differences between "
               "the RM's and the base model's weights"),
        Column("relative", "DOUBLE", "l2 / the base block's norm (over the same tensors)"),
        Column("n_tensors", "INTEGER", "tensors compared in the block (present in both, same shape)"),
        Column("chosen", "BOOLEAN", "one of the run's layers"),
    ), primary_key=("block",),
        doc="Parameter divergence per block between transfer.base_model and the RM (workers/divergence.py); "
            "layers: {top_divergence: k} takes the k largest l2. Empty: no base model configured."),

    Table("lexicon_words", (
        Column("word", "VARCHAR", "a reference lexicon word that is one token at every carrier's slot"),
        Column("reference", "DOUBLE", "its value in the reference lexicon (lexicon.reference: VADER or a CSV)"),
        Column("measured", "DOUBLE", "mean over the carriers of the RM's score with the word in place of the "
               "neutral word minus the score with the neutral word"),
        Column("measured_se", "DOUBLE", "standard error of that mean over the carriers"),
        Column("rank_difference", "DOUBLE", "the measured value's percentile rank minus the reference's: "
               "+1 the RM likes it far more than the reference, -1 far less"),
    ), primary_key=("word",),
        doc="The implicit-reward lexicon (workers/analyses/lexicon.py). Empty or absent: no lexicon configured."),

    Table("lexicon_predictions", (
        Column("layer", "INTEGER"),
        Column("word", "VARCHAR"),
        Column("predicted", "DOUBLE", "mean over the carriers of the layer's regression weights · (pooled SAE "
               "features with the word − with the neutral word): what the regression says the edit is worth"),
    ), primary_key=("layer", "word")),

    Table("lexicon_summary", (
        Column("which", "VARCHAR", "'measured' or 'layer N' (that layer's predicted lexicon)"),
        Column("layer", "INTEGER", "NULL for the measured lexicon"),
        Column("tau", "DOUBLE", "Kendall tau-b against the reference (scipy.stats.kendalltau)"),
        Column("p_value", "DOUBLE"),
        Column("tau_vs_measured", "DOUBLE", "a predicted lexicon's Kendall tau against the measured one; NULL for "
               "the measured"),
        Column("n_words", "INTEGER", "single-token words compared"),
        Column("n_multi_token_skipped", "INTEGER", "reference words skipped: more than one token at a slot"),
        Column("n_bad_rows", "INTEGER", "rows of a reference file skipped (no value, not a number, a repeat)"),
    ), primary_key=("which",)),

    Table("preference_pairs", (
        Column("pair_id", "INTEGER"),
        Column("row", "INTEGER", "the pair's row in the dataset (0-based)"),
        Column("split", "VARCHAR", "'train' (the surrogate's fit) or 'heldout'; both sides share it"),
        Column("chosen_text_id", "INTEGER", "the chosen side as the model read it (texts)"),
        Column("rejected_text_id", "INTEGER"),
        Column("chosen_score", "DOUBLE", "the RM's score of the chosen side"),
        Column("rejected_score", "DOUBLE"),
        Column("margin", "DOUBLE", "chosen_score - rejected_score"),
        Column("correct", "BOOLEAN", "margin > 0: the RM prefers the chosen side"),
    ), primary_key=("pair_id",),
        doc="Preference pairs (workers/preference_data.py): each pair's two texts and the RM's margin. Empty: the "
            "dataset is a text corpus."),

    Table("preference_wrong_features", (
        Column("layer", "INTEGER"),
        Column("pair_id", "INTEGER", "a held-out pair the RM orders wrongly (margin <= 0)"),
        Column("rank", "INTEGER", "0 = the feature pushing most toward the rejected side"),
        Column("feature", "INTEGER"),
        Column("margin_attribution", "DOUBLE", "its attribution on the chosen side minus on the rejected side "
               "(negative: toward the rejected side)"),
        Column("chosen_attribution", "DOUBLE"),
        Column("rejected_attribution", "DOUBLE"),
    ), primary_key=("layer", "pair_id", "rank"),
        doc="Per layer, for each wrongly ordered held-out pair analysed, the features that pushed the margin most "
            "toward the rejected side (preference.wrong_pair_features)."),

    Table("feature_tokens", (
        Column("layer", "INTEGER"),
        Column("token", "VARCHAR"),
        Column("feature", "INTEGER"),
    ), doc="Token search: every (layer, token, feature) where the token is one of the feature's top tokens or "
           "appears in one of its top contexts. Derived from the two tables above when the store is written "
           "(SEARCH_INDEX_SQL); tokens are normalised with NORMALISED_TOKEN."),

    Table("feature_cards", (
        Column("card_key", "BIGINT", "layer << 32 | feature (CARD_KEY); unique, indexed"),
        Column("card", "BLOB USING COMPRESSION uncompressed"),
    ), doc="What a feature page shows, as one zlib-compressed JSON document per feature, derived from the tables "
           "above when the store is written (feature_card_sql): its row of `features` (its columns with card=True), "
           "rank by |weight|, the near-duplicates it shares its weight with, nearest features with their weights, "
           "both kinds of contexts with their texts' reward, and its place in the default table view. A columnar "
           "store reads a feature's list columns a whole 2,048-row vector at a time (~20 ms a page at 32k features "
           "a layer); one uncompressed blob behind an index reads in ~1 ms. (DuckDB's own string compression made "
           "the cards 6x slower to write, or, with zstd, 50x slower to read one.)"),
)}
LAYERS, FEATURES = TABLES["layers"], TABLES["features"]


def check_display(table: Table) -> None:
    """ValueError where a column's Display does not hold: every column the layer table sorts by is
    drawn in it, from the table's rows, with a known group and rule; its tabs open its own sorts
    and its cell reads table columns. (Its format and cell kind: backend/web/feature_table.py.)"""
    table_columns = {c.name for c in table.columns if c.table}
    sort_keys = {s.key for s in sorts(table)}
    for c in table.columns:
        d, where = c.shown, f"{table.name}.{c.name}"
        if d is None:
            if c.sort_key is not None:
                raise ValueError(f"{where}: the layer table sorts by it (sort_key), so it must be drawn (shown=Display)")
            continue
        problems = ["table=True (it is drawn from the table's rows)" if not c.table else "",
                    f"group {d.group!r} is not one of {sorted(GROUPS)}" if d.group is not None and d.group not in GROUPS
                    else "",
                    f"when {d.when!r} is not one of {WHEN}" if d.when not in WHEN else "",
                    f"reads {sorted(set(d.reads) - table_columns)}, not table columns" if set(d.reads) - table_columns
                    else "",
                    "a measured cell reads (low, high, n)" if d.cell == "measured" and len(d.reads) != 3 else ""]
        own = {key for key in (c.sort_key, f"abs_{c.sort_key}") if c.sort_key and key in sort_keys}
        problems += [f"tab {t.sort!r} is not one of its sorts {sorted(own)} (or '-' one)"
                     for t in d.tabs if t.sort.lstrip("-") not in own]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(f"{where}: " + "; ".join(problems))


check_display(FEATURES)
# What the pipeline (and any other writer) gives; the rest are derived when the store is written.
WRITTEN_TABLES = ("texts", "reward_reads", "layers", "features", "contexts", "faithfulness", "feature_texts",
                 "transfer_layers", "divergence", "lexicon_words", "lexicon_predictions", "lexicon_summary",
                 "preference_pairs", "preference_wrong_features")


def schema_sql() -> str:
    """The DDL of every table, from TABLES as it is when called."""
    return "\n\n".join(t.ddl() for t in TABLES.values())


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


def order_sql(sort: str) -> str:
    """ORDER BY for a layer table sort key ('key': largest first, '-key': smallest first); NULLs
    (a dead feature's correlation, an unmeasured Δ) always last, ties by feature id."""
    expressions = {s.key: s.expression for s in sorts(FEATURES)}
    if sort.lstrip("-") not in expressions:
        raise ValueError(f"unknown sort {sort!r}; expected one of "
                         f"{', '.join(k for key in expressions for k in (key, '-' + key))}")
    return f"{expressions[sort.lstrip('-')]} {'ASC' if sort.startswith('-') else 'DESC'} NULLS LAST, feature"


def feature_card_sql(default_sort: str = "weight") -> str:
    """One layer's cards as (card_key, JSON text), $1 = the layer, in key order; the writer compresses
    them. A card holds every feature column with card=True, plus what is derived below. The default
    view is the layer table's default sort (its default ranking's), so j/k from a plain feature
    link need no query."""
    stored = ", ".join(f"{c.name} := f.{c.name}" for c in FEATURES.columns if c.card)
    return f"""
WITH layer_features AS (
    SELECT *,
           CASE WHEN weight IS NULL THEN 1
                ELSE rank() OVER (ORDER BY abs(weight) DESC NULLS LAST) END AS abs_weight_rank,
           count(*) OVER () AS n_features,
           row_number() OVER by_weight - 1 AS view_index,
           lag(feature) OVER by_weight AS view_previous,
           lead(feature) OVER by_weight AS view_next
    FROM features WHERE layer = $1
    WINDOW by_weight AS (ORDER BY {order_sql(default_sort)})
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
                       reward := t.reward, score := t.score, split := t.split,
                       response_start := t.response_start, response_end := t.response_end) AS context
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
           {stored},
           weight_group_members := g.weight_group_members,
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
