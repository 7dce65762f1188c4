"""The method, as pure functions on tensors: Taylor importance (Eq. 2-4, `importance`), the
exponential pruning schedule (Alg. 1, `search`), masks and their encoding (`masks`), Eq. 6
aggregation (`aggregate`), the flat adapter's layout (`layout`), each method's rules (`methods`),
perplexity (`metrics`), the bound and trimmed mean that keep a hostile update out (`robust`) and the
masks' diagnostics (`diagnostics`). Imports torch, numpy and `perfit.config` only."""
