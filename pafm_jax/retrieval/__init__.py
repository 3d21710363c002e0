"""Retrieved posterior candidates for PAFM (METHOD.md §3 "Candidate sources").

  keys           linear key transforms (flatten, avg_pool, random_projection)
  index          the ScaNN / exact nearest-neighbour index, stored as a movable directory
  dataset_index  the index of a config's training set: build, check, auto-build
  stage          the Grain stage that attaches each sample's k neighbours to its batch
"""
