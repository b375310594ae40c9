//! visii-pipeline (in progress).
