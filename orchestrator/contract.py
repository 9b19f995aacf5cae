"""Exit codes shared by ranks (runtime) and supervisors; no imports, so both sides can use them."""

# A rank that saved a checkpoint because it was asked to stop (preemption, requeue) exits with
# EX_TEMPFAIL: "temporary failure, run me again". Any other non-zero code is a failure.
PREEMPTED_EXIT_CODE = 75

# The `type` of the record a rank writes to its error file when it stops on request.
PREEMPTED_TYPE = "Preempted"
