"""`tailor improve`: the feedback loop from a served model's feedback to a promoted (or refused, or rolled back)
new version. One cycle runs these stages, each recording its outputs in FOLDER/state.json so a rerun skips what is
done:

    collect   feedback since the production version was trained: reviewed corrections, thumbs, up-voted answers
              (the regression set), unanswered questions; personal data redacted from corrections
    data      corrections → SFT chat records (plus replayed production records), thumbs → KTO examples, up/down
              → DPO pairs, every row carrying its feedback id; the comparison set (corrected, held-out, regression)
    train     LoRA continued from the production adapter (SFT), then KTO and DPO when configured
    eval      candidate vs production on the comparison set
    gates     improve.max_regression, improve.min_gain, improve.fail_under/fail_over; a refusal ends the cycle
    register  the candidate in the registry, parent production, lineage down to the feedback rows
    canary    the candidate answers improve.canary_share of the users of the production name
    decide    promote when the A/B test is significant, roll back when a monitor rule fires for the candidate

Every decision is a row of the registry's audit log (stage_changes) with who and why.
"""
