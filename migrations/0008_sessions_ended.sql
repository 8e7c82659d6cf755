-- Ended sessions are forgotten after [agent] ended-retention: the reaper finds them by state and
-- end time every reap-interval, without visiting the week of ended rows it keeps.
CREATE INDEX sessions_ended ON sessions(state, updated_at);
