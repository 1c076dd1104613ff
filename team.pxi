# Included by run.pyx and runq.pyx before their structs (written once: it has no twin in the C):
# how many threads decode with, chosen by measuring.
#
# Every parallel region ends with its threads waiting for each other. On an idle machine that
# costs microseconds; when another program keeps one of the cores busy, the thread waiting for that
# core holds every region up until the scheduler gives it a turn, and decode with OMP_NUM_THREADS
# threads on as many cores runs 10 to 100 times slower than on one thread (run.c does the same).
# So the decode steps (one token of one sequence) time themselves, and now and then a step tries
# the other choice, all threads or one; the faster per-step time wins. A losing trial waits twice
# as long before the next one, and one that lost by far (a busy core: it can take 100 ms) waits
# the longest gap, MAX_TRIAL_GAP steps, so that on a steady machine trials cost little. Which
# threads compute which rows changes no result: every sum is the same either way.

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

DEF FIRST_TRIAL = 2  # the first trial comes after the first steps (thread start-up, page faults)
DEF FIRST_TRIAL_GAP = 64  # decode steps between trials of the other choice, at first
DEF MAX_TRIAL_GAP = 256

cdef struct Team:
    int max_threads  # OMP_NUM_THREADS (or the cores); 0 until the first step
    bint alone  # whether the choice is one thread (else max_threads)
    bint trial  # whether this step tries the other choice
    double seconds[2]  # the last step's time with all threads [0] and alone [1]; 0: not yet
    int steps_to_trial  # decode steps until the next trial
    int trial_gap  # decode steps between trials

cdef double team_begin(Team* team, int B) noexcept nogil:
    # before a forward pass of B tokens: sets this thread's team size; returns the start time
    if team.max_threads == 0:
        team.max_threads = team_max_threads()
        team.trial_gap = FIRST_TRIAL_GAP
        team.steps_to_trial = FIRST_TRIAL
    if team.max_threads == 1:
        return 0.0
    team.trial = B == 1 and team.steps_to_trial <= 0
    team_set_threads(1 if team.alone != team.trial else team.max_threads)
    return team_clock()

cdef void team_end(Team* team, int B, double start) noexcept nogil:
    # after the pass: a decode step's time updates the choice
    cdef bint alone
    cdef double seconds
    if team.max_threads == 1:
        return
    team_set_threads(team.max_threads)  # what the rest of the program uses
    if B != 1:  # a prompt or a batch: its time per token says nothing about a decode step's
        return
    seconds = team_clock() - start
    alone = team.alone != team.trial
    team.seconds[alone] = seconds
    if not team.trial:
        team.steps_to_trial -= 1
        return
    if team.seconds[not alone] > 0 and seconds < team.seconds[not alone]:
        team.alone = alone  # the trial won: switch, and try back soon
        team.trial_gap = FIRST_TRIAL_GAP
    elif seconds > 4 * team.seconds[not alone]:
        team.trial_gap = MAX_TRIAL_GAP
    else:
        team.trial_gap = min(2 * team.trial_gap, MAX_TRIAL_GAP)
    team.steps_to_trial = team.trial_gap
