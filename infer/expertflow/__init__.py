"""ExpertFlow (METHODS.md §4): serve an MoE checkpoint whose experts live in a slow tier, with a
fixed number of fast-tier slots per layer (store, cache), a routing-path predictor that
prefetches each batch's experts (predictor), on-demand loading of what it missed, overlapped
with compute on the resident experts (offload), and a token scheduler that groups requests
with similar routes (scheduler). belady gives the offline-optimal hit rate of a trace."""
