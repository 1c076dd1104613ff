// x = token_embedding_table[token]: run.c's copy of the token's embedding row into x.
__global__ void embed(float* x, const float* token_embedding_table, int token, int dim)
{
    const float* row = token_embedding_table + (size_t)token * dim;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < dim; i += gridDim.x * blockDim.x)
        x[i] = row[i];
}
