# Included by run.pyx and runq.pyx before their structs (written once: it has no twin in the C):
# how many threads decode with, chosen by measuring.
#
# Every parallel region ends with its threads waiting for each other. On an idle machine that
# costs microseconds; when another program keeps one of the cores busy, the thread waiting for that
# core holds every region up until the scheduler gives it a turn, and decode with OMP_NUM_THREADS
# threads on as many cores runs 10 to 100 times slower than on one thread (run.c does the same).
# So the decode steps (one token of one sequence) time themselves, and now and then a few steps
# try the other choice, all threads or one; decode switches when their mean time is clearly below
# the mean of the current choice's last steps. Trials come rarely (each loss doubles the gap, one
# lost by far waits the longest), and at once when all threads' steps turn slow (a busy core from
# now on). The times compared are means of several steps with a margin: single steps, on a shared
# machine, once made one thread look faster often enough to cost 5-10% of a quiet machine's
# decode. Which threads compute which rows changes no result: every sum is the same either way.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int team_max_threads(void) { return omp_get_max_threads(); }
    static void team_set_threads(int n) { omp_set_num_threads(n); }
    static double team_clock(void) { return omp_get_wtime(); }
    #else
    static int team_max_threads(void) { return 1; }
    static void team_set_threads(int n) { (void)n; }
    static double team_clock(void) { return 0.0; }
    #endif
    """
    int team_max_threads() noexcept nogil
    void team_set_threads(int n) noexcept nogil
    double team_clock() noexcept nogil

DEF RECENT = 8  # the current choice's last step times, that trials are measured against
DEF SLOW = 1.5  # all threads: a step is slow when it takes SLOW times the fastest of them
DEF SLOW_STEPS = 3  # this many slow steps in a row start a trial of one thread
DEF TRIAL_STEPS = 2  # steps a trial runs
DEF WIN = 0.8  # a trial wins when its mean step time is under WIN times the recent mean
DEF FIRST_TRIAL = 16  # steps before the first trial, and before the first after a switch
DEF FIRST_TRIAL_GAP = 128  # steps between trials at first, doubled after each loss
DEF MAX_TRIAL_GAP = 512
# forward_batch's per-token steps that take longest (RoPE and the KV cache's writes, SwiGLU) run
# on all threads for a batch of at least this many tokens; a decode step's stay on the calling
# thread, whose step is shorter than starting a parallel region
DEF THREADED_TOKENS = 16

cdef struct Team:
    int max_threads  # OMP_NUM_THREADS (or the cores); 0 until the first step
    bint alone  # whether the choice is one thread (else max_threads)
    double recent[RECENT]  # the last step times with the current choice, a ring
    int n_recent  # how many steps of the current choice went into it
    int slow_run  # slow steps in a row (all threads)
    int trial_left  # steps of the running trial still to go; 0: no trial
    double trial_seconds  # the running trial's steps' total time
    int steps_to_trial  # steps before the next trial
    int trial_gap  # steps between trials

cdef double team_begin(Team* team, int B) noexcept nogil:
    # before a forward pass of B tokens: sets this thread's team size; returns the start time
    if team.max_threads == 0:
        team.max_threads = team_max_threads()
        team.steps_to_trial = FIRST_TRIAL
        team.trial_gap = FIRST_TRIAL_GAP
    if team.max_threads == 1:
        return 0.0
    team_set_threads(1 if team.alone != (B == 1 and team.trial_left > 0) else team.max_threads)
    return team_clock()

cdef void team_end(Team* team, int B, double start) noexcept nogil:
    # after the pass: a decode step's time updates the choice
    cdef double seconds, recent_mean = 0.0, fastest = 0.0
    cdef int k, n = 0
    cdef bint far
    if team.max_threads == 1:
        return
    team_set_threads(team.max_threads)  # what the rest of the program uses
    if B != 1:  # a prompt or a batch: its time per token says nothing about a decode step's
        return
    seconds = team_clock() - start
    n = min(team.n_recent, RECENT)
    for k in range(n):
        recent_mean += team.recent[k] / n
        fastest = team.recent[k] if k == 0 else min(fastest, team.recent[k])
    if team.trial_left > 0:  # a step of the other choice
        team.trial_seconds += seconds
        team.trial_left -= 1
        if team.trial_left > 0:
            return
        if team.trial_seconds / TRIAL_STEPS < WIN * recent_mean:
            team.alone = not team.alone
            team.n_recent = 0
            team.steps_to_trial = FIRST_TRIAL
            team.trial_gap = FIRST_TRIAL_GAP
        else:  # lost; by far (a busy core): wait the longest
            far = team.trial_seconds / TRIAL_STEPS > 4 * recent_mean
            team.trial_gap = MAX_TRIAL_GAP if far else min(2 * team.trial_gap, MAX_TRIAL_GAP)
            team.steps_to_trial = team.trial_gap
        team.slow_run = 0
        return
    team.slow_run = team.slow_run + 1 if (not team.alone and n == RECENT
                                          and seconds > SLOW * fastest) else 0
    team.recent[team.n_recent % RECENT] = seconds
    # (past RECENT, kept in RECENT .. 2 * RECENT - 1: the ring's position, and "full")
    team.n_recent = (team.n_recent + 1) % RECENT + RECENT if team.n_recent + 1 >= RECENT else team.n_recent + 1
    team.steps_to_trial -= 1
    if team.steps_to_trial <= 0 or team.slow_run >= SLOW_STEPS:
        team.trial_left = TRIAL_STEPS
        team.trial_seconds = 0.0
